"""ImageNet in ImageFolder layout, decoded and preprocessed one image at a time."""

from __future__ import annotations

import numpy as np

from rcat_ray.config import DataConfig
from rcat_ray.core.sources.base import RawSource, data_root
from rcat_ray.errors import DataError

IMAGENET_PREPROCESSING = {"resize": 256, "center_crop": 224}


def imagenet_source(cfg: DataConfig) -> RawSource:
    """ImageNet in ImageFolder layout (``root/val/<wnid>/*.JPEG`` for ``test``, ``root/train/...`` for
    ``train``/``val``), preprocessed as RobustBench does (resize 256, centre crop 224) one image at a time,
    with torchvision's own loader and transforms. Listing the folder is all that happens up front."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = data_root(cfg)
    folder = root / ("val" if cfg.split == "test" else "train")
    if not folder.is_dir():
        raise DataError(f"ImageNet is not in {root}: place the class folders at {folder}/<wnid>/*.JPEG")
    crop = IMAGENET_PREPROCESSING["center_crop"]
    ds = ImageFolder(
        str(folder),
        transform=transforms.Compose(
            [transforms.Resize(IMAGENET_PREPROCESSING["resize"]), transforms.CenterCrop(crop)]
        ),
    )

    def rows(lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, 3, crop, crop), dtype=np.uint8)
        for j, i in enumerate(range(lo, hi)):
            path = ds.samples[i][0]
            try:
                img, _ = ds[i]
            except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for unreadable image files
                raise DataError(f"cannot decode ImageNet image {path}: {err}") from None
            hwc = np.asarray(img, dtype=np.uint8)
            if hwc.shape != (crop, crop, 3):
                raise DataError(f"ImageNet image {path} gave pixels of shape {hwc.shape}, not {(crop, crop, 3)}")
            out[j] = hwc.transpose(2, 0, 1)
        return out

    return RawSource(
        dataset="imagenet",
        where=str(folder),
        ids=np.arange(len(ds), dtype=np.int64),
        labels=np.asarray(ds.targets, dtype=np.int64),
        class_names=tuple(ds.classes),
        shape=(3, crop, crop),
        dtype="uint8",
        scale=255.0,
        rows=rows,
        preprocessing=dict(IMAGENET_PREPROCESSING),
    )
