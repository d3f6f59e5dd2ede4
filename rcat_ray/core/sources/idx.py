"""Fashion-MNIST from its idx files, memory-mapped (rows are read from disk only when sliced); the files come
from the Debian package ``dataset-fashion-mnist`` or from the data folder."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

from rcat_ray.config import DataConfig
from rcat_ray.core.atomic import atomic_output
from rcat_ray.core.sources.base import RawSource, data_root, training_file
from rcat_ray.errors import DataError


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (the MNIST format: magic 0x0000 08 <ndim>, big-endian dims, then the
    values), memory-mapped: rows are read from disk only when sliced."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08:
            raise DataError(f"{path} is not an idx file of unsigned bytes (header {head.hex()})")
        ndim = head[3]
        dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
    offset = 4 + 4 * ndim
    if size != offset + int(np.prod(dims)):
        raise DataError(f"{path} holds {size - offset} bytes of values, its header says {int(np.prod(dims))}")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(dims))


#: Where the Debian package ``dataset-fashion-mnist`` installs the Fashion-MNIST files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


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
        with gzip.open(gz, "rb") as src, atomic_output(raw / name) as dst:
            shutil.copyfileobj(src, dst)
    return raw


def fashion_mnist_source(cfg: DataConfig) -> RawSource:
    raw = prepare_fashion_mnist(data_root(cfg))
    stem = "train" if training_file(cfg) else "t10k"
    images = read_idx(raw / f"{stem}-images-idx3-ubyte")
    labels = np.array(read_idx(raw / f"{stem}-labels-idx1-ubyte"), dtype=np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataError(f"{raw}: {stem} images {images.shape} and labels {labels.shape} do not pair up")
    return RawSource(
        dataset="fashion_mnist",
        where=str(raw / f"{stem}-images-idx3-ubyte"),
        ids=np.arange(len(labels), dtype=np.int64),
        labels=labels,
        class_names=FASHION_MNIST_CLASSES,
        shape=(1, *images.shape[1:]),
        dtype="uint8",
        scale=255.0,
        rows=lambda lo, hi: np.array(images[lo:hi])[:, None],
    )
