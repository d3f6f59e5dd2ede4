"""Data sources with stable sample ids and deterministic splits.

A sample id is the row index in the dataset's own file (the train file or the test file), so a
per-sample table can be joined with any other table computed on the same split, whatever slice or
chunking was used. Images are float32 in [0, 1], NCHW: every model here (RobustBench's included) takes
unnormalised pixels and normalises inside.

Readers are the libraries' own: torchvision's ``FashionMNIST``/``CIFAR10``/``CIFAR100`` on a local root
with ``download=False``, scikit-learn's ``load_digits``. Nothing is downloaded at run time; when data is
missing the error says what to place where.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rcat_ray.config import DataConfig

log = logging.getLogger(__name__)
_WARNED_WHOLE_FILE: set[str] = set()

#: Where the Debian package ``dataset-fashion-mnist`` installs the Fashion-MNIST files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

#: Default size of the validation tail of each training file (DESIGN §1.4: CIFAR-10 40k/10k).
DEFAULT_VAL_SIZE = {"fashion_mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000, "digits": 200}
#: digits has no official split: the first 1,297 images are "train", the last 500 "test".
DIGITS_TRAIN_SIZE = 1297


class DataError(ValueError):
    """Data that cannot be loaded; the message says what to place where."""


@dataclass(frozen=True)
class Split:
    """A selection of samples of one dataset, in sample-id order."""

    dataset: str
    split: str
    images: torch.Tensor  # float32 [N, C, H, W] in [0, 1]
    labels: torch.Tensor  # int64 [N]
    sample_ids: torch.Tensor  # int64 [N], strictly increasing
    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Hash of ids, labels and pixels: a changed file on disk must not hit an old cache entry."""
        h = hashlib.sha256()
        for t in (self.sample_ids, self.labels, self.images):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """What a manifest records about the evaluated samples."""
        ids = self.sample_ids
        return {
            "dataset": self.dataset,
            "split": self.split,
            "n_samples": len(self),
            "sample_id_min": int(ids[0]) if len(self) else None,
            "sample_id_max": int(ids[-1]) if len(self) else None,
            "fingerprint": self.fingerprint(),
            "num_classes": self.num_classes,
        }


def default_root() -> Path:
    """The data folder when the config names none (overridable by RCAT_RAY_DATA)."""
    return Path(os.environ.get("RCAT_RAY_DATA", Path.home() / ".cache" / "rcat_ray" / "data"))


def _warn_whole_file(cfg: DataConfig, n: int) -> None:
    """Say, once per file, that ``test`` of a tensors file is the whole file: the rows its ``train`` and ``val``
    splits also read, so a model fine-tuned on the file would be tested on its own training samples."""
    path = str(Path(cfg.path or "").expanduser().resolve())
    if path in _WARNED_WHOLE_FILE:
        return
    _WARNED_WHOLE_FILE.add(path)
    log.warning(
        "data.split 'test' of a tensors file is the whole file %s (%d samples), the same rows its 'train' and 'val' "
        "splits read: keep test samples in a file of their own", path, n,
    )


def load_split(cfg: DataConfig) -> Split:
    """Load the samples a config selects; raises DataError before any compute if that is impossible."""
    root = Path(cfg.root).expanduser() if cfg.root else default_root()
    loaders = {
        "fashion_mnist": _load_fashion_mnist,
        "digits": _load_digits,
        "cifar10": _load_cifar,
        "cifar100": _load_cifar,
        "tensors": _load_tensors,
    }
    if cfg.name == "imagenet":
        return _load_imagenet(cfg, root)
    images, labels, ids, class_names = loaders[cfg.name](cfg, root)
    if cfg.name == "tensors" and cfg.split == "test":
        _warn_whole_file(cfg, labels.shape[0])
    num_classes = len(class_names)
    val_size = cfg.val_size if cfg.val_size is not None else DEFAULT_VAL_SIZE.get(cfg.name, 0)
    n = labels.shape[0]
    if cfg.split in ("train", "val"):
        if val_size >= n:
            raise DataError(
                f"data.val_size={val_size} is not below the training file's {n} samples: "
                f"train and val are its head and tail, so val_size must be at most {n - 1}"
            )
        cut = n - val_size
        sl = slice(0, cut) if cfg.split == "train" else slice(cut, n)
        images, labels, ids = images[sl], labels[sl], ids[sl]
    split_size = labels.shape[0]
    end = None if cfg.limit is None else cfg.offset + cfg.limit
    images, labels, ids = images[cfg.offset : end], labels[cfg.offset : end], ids[cfg.offset : end]
    if labels.shape[0] == 0:
        raise DataError(
            f"the selection is empty: {cfg.name} split '{cfg.split}' has {split_size} samples and data.offset is "
            f"{cfg.offset}" + (f" (val_size {val_size})" if cfg.split != "test" else "")
        )
    return Split(
        dataset=cfg.name,
        split=cfg.split,
        images=images.contiguous(),
        labels=labels.contiguous(),
        sample_ids=ids.contiguous(),
        num_classes=num_classes,
        class_names=tuple(class_names),
    )


def _partition(cfg: DataConfig) -> bool:
    """True when the split reads the training file."""
    return cfg.split in ("train", "val")


def _to_float_images(array: np.ndarray | torch.Tensor, scale: float) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(array))
    t = t.to(torch.float32) / scale
    if t.ndim == 3:  # N, H, W -> N, 1, H, W
        t = t.unsqueeze(1)
    return t


def prepare_fashion_mnist(root: Path, source: Path = DEBIAN_FASHION_MNIST) -> Path:
    """Put the Debian package's files where torchvision's reader looks: ``root/FashionMNIST/raw``.

    torchvision cannot read the ``.gz`` files alone (and refuses to "download" them, their MD5s differ),
    so they are gunzipped once. Returns the raw folder.
    """
    raw = root / "FashionMNIST" / "raw"
    missing = [f for f in FASHION_MNIST_FILES if not (raw / f).is_file()]
    if not missing:
        return raw
    sources = {f: source / f"{f}.gz" for f in missing}
    absent = [str(p) for p in sources.values() if not p.is_file()]
    if absent:
        raise DataError(
            f"Fashion-MNIST is not in {raw} (missing {', '.join(missing)}) and the Debian package's "
            f"files are not installed ({', '.join(absent)}). Install them with "
            "'apt-get install dataset-fashion-mnist', or place the four idx files in "
            f"{raw}/ (names without .gz)."
        )
    raw.mkdir(parents=True, exist_ok=True)
    for name, gz in sources.items():
        tmp = raw / f".{name}.tmp-{os.getpid()}"
        with gzip.open(gz, "rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(raw / name)
    return raw


def _load_fashion_mnist(cfg: DataConfig, root: Path):
    from torchvision.datasets import FashionMNIST

    prepare_fashion_mnist(root)
    ds = FashionMNIST(str(root), train=_partition(cfg), download=False)
    images = _to_float_images(ds.data, 255.0)
    labels = ds.targets.to(torch.int64)
    return images, labels, torch.arange(labels.shape[0], dtype=torch.int64), FASHION_MNIST_CLASSES


def _load_digits(cfg: DataConfig, root: Path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = _to_float_images(bunch.images, 16.0)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    ids = torch.arange(labels.shape[0], dtype=torch.int64)
    sl = slice(0, DIGITS_TRAIN_SIZE) if _partition(cfg) else slice(DIGITS_TRAIN_SIZE, None)
    return images[sl], labels[sl], ids[sl], tuple(str(i) for i in range(10))


def _load_cifar(cfg: DataConfig, root: Path):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder = (CIFAR10, "cifar-10-batches-py") if cfg.name == "cifar10" else (CIFAR100, "cifar-100-python")
    if not (root / folder).is_dir():
        raise DataError(
            f"{cfg.name} is not in {root}: place the official python-version folder at "
            f"{root / folder} (on a machine with internet: "
            f"python -c \"import torchvision; torchvision.datasets.{cls.__name__}('{root}', download=True)\")"
        )
    try:
        ds = cls(str(root), train=_partition(cfg), download=False)
    except RuntimeError as err:
        raise DataError(f"{cfg.name} at {root / folder} could not be read ({err}); re-copy the folder") from None
    images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    names = tuple(ds.classes) if getattr(ds, "classes", None) else tuple(str(i) for i in range(int(labels.max()) + 1))
    return images, labels, torch.arange(labels.shape[0], dtype=torch.int64), names


def _load_tensors(cfg: DataConfig, root: Path):
    """A user's own images: ``.pt`` (a dict saved with torch.save) or ``.npz`` with ``images``, ``labels``.

    Optional keys: ``sample_ids`` (int, increasing), ``class_names``. Images are uint8 (0-255) or float in
    [0, 1], shaped N,H,W or N,C,H,W.
    """
    path = Path(cfg.path or "").expanduser()
    if not path.is_file():
        raise DataError(f"tensors file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            blob = {k: z[k] for k in z.files}
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise DataError(f"cannot read tensors file {path}: {err}") from None
    if not isinstance(blob, dict) or "images" not in blob or "labels" not in blob:
        raise DataError(f"tensors file {path} must hold a mapping with 'images' and 'labels'")
    raw = torch.as_tensor(np.asarray(blob["images"]))
    if raw.dtype == torch.uint8:
        images = _to_float_images(raw, 255.0)
    else:
        images = _to_float_images(raw, 1.0)
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise DataError(f"float images in {path} must lie in [0, 1]")
    labels = torch.as_tensor(np.asarray(blob["labels"])).to(torch.int64).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if "sample_ids" in blob:
        ids = torch.as_tensor(np.asarray(blob["sample_ids"])).to(torch.int64).reshape(-1)
        if ids.shape[0] != labels.shape[0] or (ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all())):
            raise DataError(f"{path}: sample_ids must be one strictly increasing id per image")
    else:
        ids = torch.arange(labels.shape[0], dtype=torch.int64)
    if "class_names" in blob:
        names = tuple(str(n) for n in np.asarray(blob["class_names"]).tolist())
    else:
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if labels.numel() else 0))
    return images, labels, ids, names


def _load_imagenet(cfg: DataConfig, root: Path) -> Split:
    """ImageNet from an ImageFolder layout (``root/val/<wnid>/*.JPEG``, ``root/train/...``), preprocessed as
    RobustBench does (resize 256, centre crop 224). Only the selected slice is decoded: 50k images would not
    fit in memory as floats. ``test`` reads ``val/``; ``train``/``val`` are the head/tail of ``train/``.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder = root / ("val" if cfg.split == "test" else "train")
    if not folder.is_dir():
        raise DataError(f"ImageNet is not in {root}: place the class folders at {folder}/<wnid>/*.JPEG")
    ds = ImageFolder(str(folder), transform=transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
    ))  # fmt: skip
    n = len(ds)
    val_size = cfg.val_size if cfg.val_size is not None else 0
    lo, hi = {"test": (0, n), "train": (0, n - val_size), "val": (n - val_size, n)}[cfg.split]
    start = lo + cfg.offset
    stop = hi if cfg.limit is None else min(hi, start + cfg.limit)
    if val_size >= n and cfg.split != "test":
        raise DataError(f"data.val_size={val_size} is not below the {n} images of {folder}")
    if stop <= start:
        raise DataError(
            f"the selection is empty: imagenet split '{cfg.split}' has {hi - lo} images and data.offset is {cfg.offset}"
        )
    items = [ds[i] for i in range(start, stop)]
    return Split(
        dataset="imagenet",
        split=cfg.split,
        images=torch.stack([x for x, _ in items]),
        labels=torch.as_tensor([y for _, y in items], dtype=torch.int64),
        sample_ids=torch.arange(start, stop, dtype=torch.int64),
        num_classes=len(ds.classes),
        class_names=tuple(ds.classes),
    )
