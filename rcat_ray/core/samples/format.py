"""The on-storage format of a sample set: its description (dataset.json), schema, hashes and decoding.

Layout of a set at ``dest``: ``part-NNNNN.parquet`` files of consecutive positions, in row groups of
``rows_per_group`` rows (only the last one shorter), and ``dataset.json`` (:class:`SampleSetInfo`), written
last: a set without it is not a set. Columns ``position``, ``sample_id``, ``label``, ``image`` (the C*H*W
pixel bytes of ``dtype``); each part's schema metadata repeats the set's static description, so one file is
self-describing. ``fingerprint`` hashes the rows' packed records (:func:`_records`); each row group's records
have their own sha256. The full contract: docs/contracts.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from rcat_ray.core.sources import to_float
from rcat_ray.errors import DamagedSetError, DataError

FORMAT = "rcat_ray.samples"
FORMAT_VERSION = 1
#: Key of the static description in every part file's schema metadata.
META_KEY = b"rcat_ray.samples"
INFO_FILE = "dataset.json"
#: Uncompressed pixel bytes a part file aims at: a few hundred MB files suit object stores and give Ray Data
#: one read task per file without a single file holding a whole large set.
TARGET_PART_BYTES = 128 * 2**20
SCHEMA = pa.schema([("position", pa.int64()), ("sample_id", pa.int64()), ("label", pa.int32()), ("image", pa.binary())])
_INT32 = np.iinfo(np.int32)
#: (images float32 [n, C, H, W] in [0, 1], labels int64 [n], sample_ids int64 [n])
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: Float32 bytes converted at once when the set's Split fingerprint is computed (a 224 px row group is 154 MB).
_FLOAT_SLICE_BYTES = 2**20


# -- metadata ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartInfo:
    """One part file: which positions it holds and the sha256 of each of its row groups."""

    name: str
    first_row: int
    num_rows: int
    size: int  # bytes on storage: a cheap check that the file is the one written
    row_groups: tuple[str, ...]  # sha256 of each row group's packed records, in order


@dataclass(frozen=True)
class SampleSetInfo:
    """What dataset.json records: enough to read, check and describe the set without touching the parts."""

    dataset: str
    split: str
    shape: tuple[int, int, int]  # C, H, W
    dtype: str  # "uint8" or "float32": the stored pixel type
    scale: float  # float pixel = stored / scale (in float32)
    num_classes: int
    class_names: tuple[str, ...]
    preprocessing: dict[str, Any] | None  # e.g. IMAGENET_PREPROCESSING; None when pixels are the source's
    selection: dict[str, Any]  # the DataConfig fields and source that determine the rows
    num_rows: int = 0
    rows_per_group: int = 0
    fingerprint: str = ""  # sha256 of all rows' packed records, in position order
    split_fingerprint: str = ""  # Split.fingerprint() of the same samples (result-table cache keys use it)
    sample_id_min: int | None = None
    sample_id_max: int | None = None
    parts: tuple[PartInfo, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def row_nbytes(self) -> int:
        """Bytes of one stored image."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def static(self) -> dict[str, Any]:
        """The description every part file carries in its schema metadata (known before any row is written)."""
        keys = (
            "format",
            "format_version",
            "dataset",
            "split",
            "shape",
            "dtype",
            "scale",
            "num_classes",
            "class_names",
            "preprocessing",
            "selection",
        )
        d = asdict(self)
        return {k: d[k] for k in keys}

    def describe(self) -> dict[str, Any]:
        """The same dict as ``Split.describe()`` for these samples: result manifests and cache keys stay equal."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "n_samples": self.num_rows,
            "sample_id_min": self.sample_id_min,
            "sample_id_max": self.sample_id_max,
            "fingerprint": self.split_fingerprint,
            "num_classes": self.num_classes,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SampleSetInfo:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["class_names"] = tuple(d["class_names"])
        d["parts"] = tuple(PartInfo(**{**p, "row_groups": tuple(p["row_groups"])}) for p in d["parts"])
        return cls(**d)


def _records(ids: np.ndarray, labels: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Rows packed as the fingerprint defines them: ``<i8`` sample_id, ``<i4`` label, image bytes.

    One contiguous buffer per row group means one hash update per group instead of three per row.
    """
    rec = np.empty(len(ids), dtype=np.dtype([("id", "<i8"), ("label", "<i4"), ("image", "u1", (flat.shape[1],))]))
    rec["id"] = ids
    rec["label"] = labels
    rec["image"] = flat
    return rec


# -- filesystems ------------------------------------------------------------------------------------
def _resolve(uri: str | Path, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path, a URI, or a path inside an explicitly given filesystem."""
    uri = str(uri)
    if filesystem is not None:
        return filesystem, uri.rstrip("/") or uri
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/") or path
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _renames_folders(fs: pafs.FileSystem) -> bool:
    """Whether a folder can be renamed atomically (local disks; object stores copy object by object)."""
    if isinstance(fs, pafs.SubTreeFileSystem):
        return _renames_folders(fs.base_fs)
    return isinstance(fs, pafs.LocalFileSystem)


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder else name


def _read_info(fs: pafs.FileSystem, root: str, uri: str) -> SampleSetInfo | None:
    """The set's dataset.json, None when there is none; DataError naming the file when it is unusable."""
    path = _join(root, INFO_FILE)
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    where = f"{uri.rstrip('/')}/{INFO_FILE}"
    try:
        d = json.loads(raw)
        if d.get("format") != FORMAT:
            raise DamagedSetError(uri, INFO_FILE, f"is not a sample set description (format {d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{where} has format version {d.get('format_version')}, this code reads {FORMAT_VERSION}: use the "
                "rcat_ray that wrote it, or prepare the set again in another place"
            )
        return SampleSetInfo.from_json(d)
    except DataError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise DamagedSetError(uri, INFO_FILE, f"is unreadable ({err})") from None


def _info_bytes(info: SampleSetInfo) -> bytes:
    return (json.dumps(info.to_json(), indent=1, sort_keys=True) + "\n").encode()


def _binary_values(column: pa.Array | pa.ChunkedArray, row_nbytes: int) -> np.ndarray:
    """The bytes of a binary column of equal-length values as one [n, row_nbytes] uint8 array.

    Reads Arrow's value buffer directly (zero-copy for one chunk) instead of making a Python bytes object
    per image.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = []
    for arr in chunks:
        if arr.null_count:
            raise DataError("the image column holds nulls")
        if len(arr) == 0:
            continue
        if pa.types.is_large_binary(arr.type):
            off_type = np.int64
        elif pa.types.is_binary(arr.type):
            off_type = np.int32
        else:
            raise DataError(f"the image column has type {arr.type}, expected binary")
        offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset : arr.offset + len(arr) + 1]
        if not (np.diff(offsets) == row_nbytes).all():
            raise DataError(f"image values are not all {row_nbytes} bytes long")
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        out.append(data.reshape(len(arr), row_nbytes))
    if not out:
        return np.empty((0, row_nbytes), dtype=np.uint8)
    return out[0] if len(out) == 1 else np.concatenate(out)


def decode_images(column: Any, info: SampleSetInfo) -> np.ndarray:
    """Float32 [n, C, H, W] images from an ``image`` column as any reader returns it: a pyarrow (chunked)
    array, or the numpy array of ``bytes`` objects Ray Data batches hold. The one decoding path, so a Ray
    batch gives exactly the tensors :meth:`SampleSet.read_rows` gives."""
    if isinstance(column, pa.Array | pa.ChunkedArray):
        flat = _binary_values(column, info.row_nbytes)
    else:
        values = list(column)
        if any(len(v) != info.row_nbytes for v in values):
            raise DataError(f"image values are not all {info.row_nbytes} bytes long")
        flat = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), info.row_nbytes)
    raw = flat.view(np.dtype(info.dtype).newbyteorder("<")).reshape(len(flat), *info.shape)
    return to_float(raw, info.dtype, info.scale)
