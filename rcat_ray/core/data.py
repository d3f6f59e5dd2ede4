"""Data sources with stable sample ids and deterministic splits.

A sample id is the row index in the dataset's own file (the train file or the test file), so a
per-sample table can be joined with any other table computed on the same split, whatever slice or
chunking was used. Images are float32 in [0, 1], NCHW: every model here (RobustBench's included) takes
unnormalised pixels and normalises inside.

The files are read by :mod:`rcat_ray.core.sources` (memory-mapped idx and tensors files, CIFAR's pickles a
batch at a time, ImageFolder images one at a time), so ``load_split`` decodes only the rows it selects.
Nothing is downloaded at run time; when data is missing the error says what to place where.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from rcat_ray.config import DataConfig
from rcat_ray.core.sources import (  # noqa: F401 - re-exported: the names callers import from here
    DEBIAN_FASHION_MNIST,
    DEFAULT_VAL_SIZE,
    DIGITS_TRAIN_SIZE,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    DataError,
    default_root,
    open_source,
    prepare_fashion_mnist,
    select,
    to_float,
)


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


def load_split(cfg: DataConfig) -> Split:
    """Decode the samples a config selects, and only those; raises DataError before any compute if that is
    impossible. For sets larger than memory use the sample store (:mod:`rcat_ray.core.samples`)."""
    src = open_source(cfg)
    start, stop = select(cfg, len(src), src.where)
    images = torch.from_numpy(to_float(src.rows(start, stop), src.dtype, src.scale))
    return Split(
        dataset=src.dataset,
        split=cfg.split,
        images=images.contiguous(),
        labels=torch.from_numpy(src.labels[start:stop].copy()),
        sample_ids=torch.from_numpy(src.ids[start:stop].copy()),
        num_classes=len(src.class_names),
        class_names=src.class_names,
    )
