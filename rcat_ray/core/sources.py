"""Each dataset's own files, read a few rows at a time.

A :class:`RawSource` is one file partition of a dataset (its training file or its test file) that knows its
length, sample ids and labels up front (small: 8 bytes a row) and hands out the pixels of any row range on
demand, in the dtype the file holds them. Nothing here reads a whole image file into memory: idx files
(Fashion-MNIST, MNIST) and ``.pt`` tensors are memory-mapped, ``.npz`` members are read row range by row
range out of the zip, CIFAR's pickles are opened one batch at a time, ImageNet folders decode one image at a
time. :func:`select` is the one definition of which positions a :class:`DataConfig` picks (``split``,
``val_size``, ``offset``, ``limit``); ``load_split`` and the sample store both go through it.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rcat_ray.config import DataConfig
from rcat_ray.core.atomic import atomic_output
from rcat_ray.errors import DataError

log = logging.getLogger(__name__)
_WARNED_WHOLE_FILE: set[str] = set()


#: Default size of the validation tail of each training file (CIFAR-10: 40k train / 10k val).
DEFAULT_VAL_SIZE = {"fashion_mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000, "digits": 200}
#: digits has no official split: the first 1,297 images are "train", the last 500 "test".
DIGITS_TRAIN_SIZE = 1297
#: stored-integer -> float divisor of sources whose pixels are not 0..255 (digits: 0..16).
UINT8_SCALE = {"digits": 16.0}
IMAGENET_PREPROCESSING = {"resize": 256, "center_crop": 224}


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


# -- the selection ----------------------------------------------------------------------------------
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
            "'val' splits read: keep test samples in a file of their own", path, n,
        )


def open_source(cfg: DataConfig) -> RawSource:
    """The file partition ``cfg`` reads (train file for ``train``/``val``, test file for ``test``), opened
    lazily; DataError naming what to place where when it is missing or unreadable."""
    openers = {
        "fashion_mnist": _fashion_mnist,
        "digits": _digits,
        "cifar10": _cifar,
        "cifar100": _cifar,
        "tensors": _tensors,
        "imagenet": _imagenet,
    }
    return openers[cfg.name](cfg)


def selection_size(cfg: DataConfig) -> int:
    """How many samples ``cfg`` selects, from the files' metadata (no pixel is decoded)."""
    src = open_source(cfg)
    start, stop = select(cfg, len(src), src.where)
    return stop - start


def _training_file(cfg: DataConfig) -> bool:
    return cfg.split in ("train", "val")


# -- idx files (Fashion-MNIST, MNIST) -----------------------------------------------------------------
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
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


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


def _fashion_mnist(cfg: DataConfig) -> RawSource:
    raw = prepare_fashion_mnist(data_root(cfg))
    stem = "train" if _training_file(cfg) else "t10k"
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


# -- digits (scikit-learn) --------------------------------------------------------------------------
def _digits(cfg: DataConfig) -> RawSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # 1,797 8x8 images shipped inside scikit-learn's wheel
    part = slice(0, DIGITS_TRAIN_SIZE) if _training_file(cfg) else slice(DIGITS_TRAIN_SIZE, None)
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


# -- CIFAR (the official python-version pickles) ----------------------------------------------------
def _cifar(cfg: DataConfig) -> RawSource:
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
    files = cls.train_list if _training_file(cfg) else cls.test_list
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


# -- a user's tensors file (.npz or .pt) ------------------------------------------------------------
class _NpyInZip:
    """An array member of an ``.npz``, read row range by row range straight out of the zip (stored or
    deflated): the header is parsed with numpy's own reader, rows are read forward without loading the rest."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as z, z.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise DataError(f"{path}: {member} is in .npy format version {version}, which is not supported")
            self.shape, fortran, self.dtype = readers[version](fh)
            self.offset = fh.tell()
        if fortran or self.dtype.hasobject or not self.shape:
            raise DataError(f"{path}: '{member[:-4]}' must be a C-order numeric array (np.savez of a numpy array)")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._zip: zipfile.ZipFile | None = None
        self._fh = None
        self._at = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_fh": None, "_at": 0}

    def __len__(self) -> int:
        return int(self.shape[0])

    def rows(self, lo: int, hi: int) -> np.ndarray:
        if self._fh is None or lo < self._at:  # deflated members only read forward: reopen to go back
            self.close()
            self._zip = zipfile.ZipFile(self.path)
            self._fh = self._zip.open(self.member)
            self._fh.seek(self.offset)
            self._at = 0
        if lo > self._at:
            self._fh.seek(self.offset + lo * self.row_bytes)
        buf = self._fh.read((hi - lo) * self.row_bytes)
        if len(buf) != (hi - lo) * self.row_bytes:
            raise DataError(f"{self.path}: '{self.member}' ends before row {hi}")
        self._at = hi
        return np.frombuffer(buf, dtype=self.dtype).reshape(hi - lo, *self.shape[1:])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._zip.close()
        self._zip = self._fh = None


def _tensors(cfg: DataConfig) -> RawSource:
    """A user's own images: ``.npz`` (``np.savez``) or ``.pt`` (a dict saved with ``torch.save``) with
    ``images`` (uint8 0-255, or float in [0, 1]; N,H,W or N,C,H,W) and ``labels``; optional ``sample_ids``
    (int, strictly increasing) and ``class_names``. Images are read a row range at a time."""
    path = Path(cfg.path or "").expanduser()
    if not path.is_file():
        raise DataError(f"tensors file not found: {path}")
    if path.suffix == ".npz":
        small, images = _npz(path)
        shape, dtype, read = tuple(images.shape), images.dtype, images.rows
    else:
        small, tensor = _pt(path)
        shape = tuple(tensor.shape)
        dtype = np.dtype(np.uint8) if tensor.dtype == torch.uint8 else np.dtype(np.float32)
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise DataError(f"{path}: images of dtype {tensor.dtype} are neither uint8 nor float")

        def read(lo: int, hi: int) -> np.ndarray:
            x = tensor[lo:hi]
            return x.numpy() if x.dtype == torch.uint8 else x.to(torch.float32).numpy()

    if len(shape) not in (3, 4):
        raise DataError(f"{path}: images must be N,H,W or N,C,H,W, not of shape {shape}")
    n = shape[0]
    labels = np.asarray(small["labels"]).astype(np.int64).reshape(-1)
    if labels.shape[0] != n:
        raise DataError(f"{path}: {n} images but {labels.shape[0]} labels")
    if "sample_ids" in small:
        ids = np.asarray(small["sample_ids"]).astype(np.int64).reshape(-1)
        if ids.shape[0] != n or (n > 1 and not bool((ids[1:] > ids[:-1]).all())):
            raise DataError(f"{path}: sample_ids must be one strictly increasing id per image")
    else:
        ids = np.arange(n, dtype=np.int64)
    if "class_names" in small:
        names = tuple(str(x) for x in np.asarray(small["class_names"]).tolist())
    else:
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if n else 0))
    u8 = dtype == np.uint8
    if not u8 and dtype.kind not in "fiu":
        raise DataError(f"{path}: images of dtype {dtype} are neither uint8 nor float")

    def rows(lo: int, hi: int) -> np.ndarray:
        x = read(lo, hi)
        x = x.astype(np.uint8 if u8 else np.float32, copy=True)
        if not u8 and x.size and not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails too
            raise DataError(f"float images in {path} must lie in [0, 1] (rows {lo}..{hi - 1} do not)")
        return x if x.ndim == 4 else x[:, None]

    return RawSource(
        dataset="tensors",
        where=str(path),
        ids=ids,
        labels=labels,
        class_names=names,
        shape=tuple(shape[1:]) if len(shape) == 4 else (1, *shape[1:]),
        dtype="uint8" if u8 else "float32",
        scale=255.0 if u8 else 1.0,
        rows=rows,
    )


def _npz(path: Path) -> tuple[dict, _NpyInZip]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files or "labels" not in z.files:
                raise DataError(f"tensors file {path} must hold a mapping with 'images' and 'labels'")
            small = {k: z[k] for k in z.files if k != "images"}  # labels, ids, names: 8 bytes a row at most
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"cannot read tensors file {path}: {err}") from None
    return small, _NpyInZip(path, "images.npy")


def _pt(path: Path) -> tuple[dict, torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise DataError(f"cannot read tensors file {path}: {err}") from None
        log.warning("%s is in torch's legacy format, which cannot be memory-mapped: loaded whole", path)
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"cannot read tensors file {path}: {err}") from None
    if not isinstance(blob, dict) or "images" not in blob or "labels" not in blob:
        raise DataError(f"tensors file {path} must hold a mapping with 'images' and 'labels'")
    images = torch.as_tensor(blob["images"])
    small = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in blob.items() if k != "images"}
    return small, images


# -- ImageNet (an ImageFolder) ----------------------------------------------------------------------
def _imagenet(cfg: DataConfig) -> RawSource:
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
    ds = ImageFolder(str(folder), transform=transforms.Compose(
        [transforms.Resize(IMAGENET_PREPROCESSING["resize"]), transforms.CenterCrop(crop)]
    ))  # fmt: skip

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
