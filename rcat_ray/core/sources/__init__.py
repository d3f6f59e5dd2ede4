"""Each dataset's own files, read a few rows at a time.

A :class:`RawSource` is one file partition of a dataset (its training or its test file) that knows its length,
sample ids and labels up front (8 bytes a row) and hands out the pixels of any row range on demand. Nothing
reads a whole image file into memory. One reader per family: idx files (:mod:`.idx`), scikit-learn's digits
(:mod:`.digits`), CIFAR's pickles (:mod:`.cifar`), a user's ``.npz``/``.pt`` file (:mod:`.tensors`), ImageNet
folders (:mod:`.imagenet`); :func:`select` (:mod:`.selection`) is the one definition of which positions a
:class:`DataConfig` picks.
"""

from rcat_ray.core.sources.base import RawSource, data_root, default_root, to_float, training_file
from rcat_ray.core.sources.digits import DIGITS_TRAIN_SIZE, UINT8_SCALE
from rcat_ray.core.sources.idx import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    prepare_fashion_mnist,
    read_idx,
)
from rcat_ray.core.sources.imagenet import IMAGENET_PREPROCESSING
from rcat_ray.core.sources.selection import DEFAULT_VAL_SIZE, open_source, select, selection_size, val_size_of
from rcat_ray.errors import DataError as DataError  # core/data.py re-exports it from here

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_VAL_SIZE",
    "DIGITS_TRAIN_SIZE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "IMAGENET_PREPROCESSING",
    "UINT8_SCALE",
    "RawSource",
    "data_root",
    "default_root",
    "open_source",
    "prepare_fashion_mnist",
    "read_idx",
    "select",
    "selection_size",
    "to_float",
    "training_file",
    "val_size_of",
]
