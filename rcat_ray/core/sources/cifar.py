"""CIFAR-10/100 from the official python-version pickles, one batch unpickled at a time."""

from __future__ import annotations

import pickle

import numpy as np

from rcat_ray.config import DataConfig
from rcat_ray.core.sources.base import RawSource, data_root, training_file
from rcat_ray.errors import DataError


def cifar_source(cfg: DataConfig) -> RawSource:
    """CIFAR-10/100 batch by batch: labels from one pass over the pickles, pixels unpickled one batch at a
    time (30 MB each) when their rows are asked for. File names, MD5s and keys are torchvision's."""
    import torchvision.datasets.cifar as tv
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    root = data_root(cfg)
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise DataError(
            f"{cfg.name} is not in {root}: place the official python-version folder at "
            f"{folder} (on a machine with internet: "
            f"python -c \"import torchvision; torchvision.datasets.{cls.__name__}('{root}', download=True)\")"
        )
    files = cls.train_list if training_file(cfg) else cls.test_list
    for name, md5 in [*files, [cls.meta["filename"], cls.meta["md5"]]]:
        if not tv.check_integrity(str(folder / name), md5):
            raise DataError(
                f"{cfg.name} at {folder} could not be read ({name} is missing or damaged); re-copy the folder"
            )

    def unpickle(name: str) -> dict:
        try:
            with (folder / name).open("rb") as fh:
                return pickle.load(fh, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError) as err:
            raise DataError(f"{cfg.name}: cannot read {folder / name} ({err}); re-copy the folder") from None

    labels, bounds = [], [0]
    for name, _ in files:
        entry = unpickle(name)
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        bounds.append(len(labels))
        del entry
    class_names = tuple(unpickle(cls.meta["filename"])[cls.meta["key"]])
    cache: dict[int, np.ndarray] = {}

    def batch(k: int) -> np.ndarray:
        if k not in cache:
            cache.clear()  # one batch held at a time
            data = np.asarray(unpickle(files[k][0])["data"], dtype=np.uint8)
            cache[k] = data.reshape(-1, 3, 32, 32)
        return cache[k]

    def rows(lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, 3, 32, 32), dtype=np.uint8)
        for k in range(len(files)):
            a, b = max(lo, bounds[k]), min(hi, bounds[k + 1])
            if a < b:
                out[a - lo : b - lo] = batch(k)[a - bounds[k] : b - bounds[k]]
        return out

    return RawSource(
        dataset=cfg.name,
        where=str(folder),
        ids=np.arange(len(labels), dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        shape=(3, 32, 32),
        dtype="uint8",
        scale=255.0,
        rows=rows,
    )
