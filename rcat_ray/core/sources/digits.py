"""scikit-learn's digits (1,797 8x8 images inside its wheel): a small dataset for tests and the quick start."""

from __future__ import annotations

import numpy as np

from rcat_ray.config import DataConfig
from rcat_ray.core.sources.base import RawSource, training_file

#: digits has no official split: the first 1,297 images are "train", the last 500 "test".
DIGITS_TRAIN_SIZE = 1297
#: stored-integer -> float divisor of sources whose pixels are not 0..255 (digits: 0..16).
UINT8_SCALE = {"digits": 16.0}


def digits_source(cfg: DataConfig) -> RawSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # 1,797 8x8 images shipped inside scikit-learn's wheel
    part = slice(0, DIGITS_TRAIN_SIZE) if training_file(cfg) else slice(DIGITS_TRAIN_SIZE, None)
    pixels = bunch.images[part].astype(np.uint8)[:, None]  # integers 0..16
    return RawSource(
        dataset="digits",
        where="scikit-learn's digits",
        ids=np.arange(len(bunch.target), dtype=np.int64)[part],
        labels=np.asarray(bunch.target, dtype=np.int64)[part],
        class_names=tuple(str(i) for i in range(10)),
        shape=(1, 8, 8),
        dtype="uint8",
        scale=UINT8_SCALE["digits"],
        rows=lambda lo, hi: pixels[lo:hi].copy(),
    )
