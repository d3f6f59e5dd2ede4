"""Which positions of a file partition a :class:`DataConfig` picks (``split``, ``val_size``, ``offset``,
``limit``): the one definition, which ``load_split`` and the sample store both go through; and which reader
opens the partition."""

from __future__ import annotations

import logging
from pathlib import Path

from rcat_ray.config import DataConfig
from rcat_ray.core.sources.base import RawSource
from rcat_ray.core.sources.cifar import cifar_source
from rcat_ray.core.sources.digits import digits_source
from rcat_ray.core.sources.idx import fashion_mnist_source
from rcat_ray.core.sources.imagenet import imagenet_source
from rcat_ray.core.sources.tensors import tensors_source
from rcat_ray.errors import DataError

log = logging.getLogger(__package__)  # rcat_ray.core.sources, the name its records always had
_WARNED_WHOLE_FILE: set[str] = set()

#: Default size of the validation tail of each training file (CIFAR-10: 40k train / 10k val).
DEFAULT_VAL_SIZE = {"fashion_mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000, "digits": 200}


def val_size_of(cfg: DataConfig) -> int:
    return cfg.val_size if cfg.val_size is not None else DEFAULT_VAL_SIZE.get(cfg.name, 0)


def select(cfg: DataConfig, n: int, where: str) -> tuple[int, int]:
    """Positions [start, stop) of a file partition of ``n`` rows that ``cfg`` selects; DataError when none.

    ``train``/``val`` are the head and the ``val_size`` tail of the training file, ``test`` the whole test
    file; then ``offset`` rows are skipped and at most ``limit`` taken.
    """
    lo, hi = 0, n
    if cfg.split in ("train", "val"):
        val_size = val_size_of(cfg)
        if val_size >= n:
            raise DataError(
                f"data.val_size={val_size} is not below the {n} samples of {where}: train and val are its head "
                f"and tail, so val_size must be at most {n - 1}"
            )
        lo, hi = (0, n - val_size) if cfg.split == "train" else (n - val_size, n)
    elif cfg.name == "tensors":
        _warn_whole_file(where, n)
    start = lo + cfg.offset
    stop = hi if cfg.limit is None else min(hi, start + cfg.limit)
    if stop <= start:
        raise DataError(
            f"the selection is empty: {cfg.name} split '{cfg.split}' has {hi - lo} samples and data.offset is "
            f"{cfg.offset}" + (f" (val_size {val_size_of(cfg)})" if cfg.split != "test" else "")
        )
    return start, stop


def _warn_whole_file(where: str, n: int) -> None:
    """Say, once per file, that ``test`` of a tensors file is the whole file: the rows its ``train`` and ``val``
    splits also read, so a model fine-tuned on the file would be tested on its own training samples."""
    path = str(Path(where).resolve())
    if path not in _WARNED_WHOLE_FILE:
        _WARNED_WHOLE_FILE.add(path)
        log.warning(
            "data.split 'test' of a tensors file is the whole file %s (%d samples), the same rows its 'train' and "
            "'val' splits read: keep test samples in a file of their own",
            path,
            n,
        )


def open_source(cfg: DataConfig) -> RawSource:
    """The file partition ``cfg`` reads (train file for ``train``/``val``, test file for ``test``), opened
    lazily; DataError naming what to place where when it is missing or unreadable."""
    openers = {
        "fashion_mnist": fashion_mnist_source,
        "digits": digits_source,
        "cifar10": cifar_source,
        "cifar100": cifar_source,
        "tensors": tensors_source,
        "imagenet": imagenet_source,
    }
    return openers[cfg.name](cfg)


def selection_size(cfg: DataConfig) -> int:
    """How many samples ``cfg`` selects, from the files' metadata (no pixel is decoded)."""
    src = open_source(cfg)
    start, stop = select(cfg, len(src), src.where)
    return stop - start
