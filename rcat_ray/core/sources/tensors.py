"""A user's tensors file: ``.npz`` members read a row range at a time out of the zip, ``.pt`` tensors
memory-mapped."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch

from rcat_ray.config import DataConfig
from rcat_ray.core.sources.base import RawSource
from rcat_ray.errors import DataError

log = logging.getLogger(__package__)  # rcat_ray.core.sources, the name its records always had


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


def tensors_source(cfg: DataConfig) -> RawSource:
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
