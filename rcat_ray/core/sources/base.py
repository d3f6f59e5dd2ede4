"""What every reader returns: a :class:`RawSource` (one file partition, its pixels read on demand), where the
data lives, and how stored pixels become floats."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcat_ray.config import DataConfig


@dataclass(frozen=True)
class RawSource:
    """One file partition, its pixels read on demand.

    ``rows(lo, hi)`` gives the pixels of positions [lo, hi) as a fresh ``[n, C, H, W]`` array of ``dtype``;
    the float image is ``pixels / scale`` in float32 (uint8 sources) or the pixels themselves (float32).
    """

    dataset: str
    where: str
    ids: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    shape: tuple[int, int, int]
    dtype: str
    scale: float
    rows: Callable[[int, int], np.ndarray]
    preprocessing: dict | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_root() -> Path:
    """The data folder when the config names none (overridable by RCAT_RAY_DATA)."""
    return Path(os.environ.get("RCAT_RAY_DATA", Path.home() / ".cache" / "rcat_ray" / "data"))


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else default_root()


def to_float(raw: np.ndarray, dtype: str, scale: float) -> np.ndarray:
    """Stored pixels -> float32 in [0, 1]: one float32 IEEE division (what torchvision's ToTensor computes).

    Done on the CPU on purpose: CUDA divides by a scalar through its reciprocal, which can differ in the
    last bit, so a worker should decode here and then move the float tensor to its device.
    """
    if dtype == "uint8":
        out = raw.astype(np.float32)
        return np.divide(out, np.float32(scale), out=out)  # in place: one float copy of the batch, not two
    return np.array(raw, dtype=np.float32)  # a writable, native-order copy


def training_file(cfg: DataConfig) -> bool:
    """Whether ``cfg`` reads the training file (``train``/``val``) rather than the test file."""
    return cfg.split in ("train", "val")
