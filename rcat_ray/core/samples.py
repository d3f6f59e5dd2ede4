"""Prepared sample sets: the samples of a selection, stored once as Parquet, read back a chunk at a time.

``load_split`` decodes a whole selection into float32 in the caller's memory; ImageNet val at 224 px is 30 GB
that way, and a driver that ships it to workers sends it over the network once per worker. A *sample set*
is the same selection read from the dataset's files a row group at a time (:mod:`rcat_ray.core.sources`:
JPEG decode, resize and crop for ImageNet), stored as compact uint8 pixels in a folder
that every node can read (a local path, or a URI pyarrow's filesystems understand: ``file://``, ``s3://``,
``gs://``), laid out in row groups so that a worker reads the rows of its own chunk and nothing else.

Layout of a set at ``dest``::

    dest/part-00000.parquet   rows [0, k), row groups of ``rows_per_group`` rows (only the last one shorter)
    dest/part-00001.parquet   rows [k, 2k), ...
    dest/dataset.json         everything below; written last: a set without it is not a set

Columns: ``position`` int64 (the row's index in the set, 0..N-1: chunks are ranges of positions),
``sample_id`` int64 (the id ``load_split`` gives it: stable across slices), ``label`` int32, ``image`` binary
(the C*H*W pixel bytes, C-order, of ``dtype``: uint8, or little-endian float32 for float images that
uint8 cannot hold exactly). A float pixel is ``stored / scale`` computed in float32, which is exactly what
``load_split`` computes, so :meth:`SampleSet.read_rows` returns bit-identical tensors and the per-sample
tables and their cache keys do not change. Each part's schema metadata (key ``rcat_ray.samples``) repeats
the set's static description (shape, dtype, scale, classes, preprocessing), so a single file is
self-describing for a reader that never sees dataset.json (Ray Data's ``read_parquet``).

Integrity. ``fingerprint`` is the sha256 of the rows' packed records (``<i8`` sample_id, ``<i4`` label, the
image bytes) in position order, computed while writing; each row group's records have their own sha256 in
dataset.json, so a worker that reads one chunk checks exactly the bytes it read (one hash over bytes it
decodes anyway), and :meth:`SampleSet.verify` checks the whole set. ``split_fingerprint`` is
``Split.fingerprint()`` of the same samples (computed while the source streams them), so
:meth:`SampleSet.describe` equals ``load_split(cfg).describe()`` without decoding anything.

Writes are atomic and a set is never overwritten: on a local filesystem the set is written into a hidden
sibling folder ``.<name>.tmp-<uuid>`` renamed to ``dest`` at the end (the folder appears complete or not at
all); object stores have no folder rename, so there each preparer writes its parts under a subfolder of its
own (``dest/p-<uuid>/part-00000.parquet``) and dataset.json, written last, names them: it is the completion
marker, and a reader sees only the parts it names. Preparing a selection that ``dest`` already holds returns
it; two preparers racing end with one set, and neither deletes anything the other wrote (see
:func:`prepare_samples`). A set in a result store found damaged is moved to the store's quarantine and
prepared again (:func:`samples_in_store`).

Pure pyarrow + numpy + torch: no Ray import (the Ray layer reads these folders with ``ray.data.read_parquet``).
"""

from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from rcat_ray.config import DataConfig
from rcat_ray.core.data import Split
from rcat_ray.core.sources import (  # noqa: F401 - IMAGENET_PREPROCESSING: re-exported
    IMAGENET_PREPROCESSING,
    RawSource,
    data_root,
    open_source,
    select,
    to_float,
    val_size_of,
)
from rcat_ray.errors import DamagedSetError, DataError, NotASetError

log = logging.getLogger(__name__)

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
#: What to do about a damaged or foreign set: sets are never overwritten, so the folder must go first.
_REDO = DamagedSetError.REDO
#: The result store's folder for damaged artifacts (``store.result_store.QUARANTINE_DIR``: the core does not import
#: the store, which sits above it).
QUARANTINE_FOLDER = "quarantine"


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
        keys = ("format", "format_version", "dataset", "split", "shape", "dtype", "scale", "num_classes",
                "class_names", "preprocessing", "selection")  # fmt: skip
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


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent, _, name = path.rpartition("/")
    tmp = _join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


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


# -- sources ----------------------------------------------------------------------------------------
def _selection(cfg: DataConfig) -> dict[str, Any]:
    """What determines a set's rows, as JSON: the reuse check compares it with an existing set's.

    Cheap by design (no pixel is decoded): a ``tensors`` file is identified by its sha256 (a changed file
    must not hit an old set), an ImageNet folder by its path.
    """
    sel: dict[str, Any] = {"dataset": cfg.name, "split": cfg.split, "offset": cfg.offset, "limit": cfg.limit}
    if cfg.split != "test":
        sel["val_size"] = val_size_of(cfg)
    if cfg.name == "tensors":
        path = Path(cfg.path or "").expanduser()
        if not path.is_file():
            raise DataError(f"tensors file not found: {path}")
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        sel["source"] = {"path": str(path.resolve()), "sha256": h.hexdigest()}
    elif cfg.name != "digits":  # digits ships inside scikit-learn's wheel
        sel["source"] = {"root": str(data_root(cfg).resolve())}
    return sel


@dataclass
class _Source:
    """A selection ready to be written: its static description, and a generator of its row groups that also
    computes ``Split.fingerprint()`` of what it yields (set once the generator is exhausted)."""

    info: SampleSetInfo
    groups: Any  # callable(rows_per_group) -> Iterator[(ids int64, labels int64, pixels [n,C,H,W] of dtype)]
    split_fingerprint: str | None = None


def _uint8_exact(raw: RawSource, start: int, stop: int) -> bool:
    """Whether every float pixel of rows [start, stop) is some k/255 (k in 0..255) exactly as float32
    computes it, bit for bit, so that uint8 stores it losslessly. One streaming pass, about 1 MB at a time."""
    block = max(1, _FLOAT_SLICE_BYTES // (4 * int(np.prod(raw.shape))))
    for lo in range(start, stop, block):
        x = raw.rows(lo, min(stop, lo + block))
        q = np.round(x * np.float32(255.0))
        if not bool(((q >= 0) & (q <= 255)).all()):  # NaN fails here too
            return False
        if not np.array_equal(to_float(q.astype(np.uint8), "uint8", 255.0).view(np.int32), x.view(np.int32)):
            return False  # compared as bits: -0.0 != 0.0
    return True


def _open_source(cfg: DataConfig, selection: dict[str, Any]) -> _Source:
    """The selection as a stream of row groups read from the dataset's own files (:mod:`.sources`): at most
    one row group of pixels is held, whatever the size of the selection.

    Float pixels that are all exact multiples of 1/255 are stored as uint8 (decided by one streaming pass);
    other float pixels as float32. Either way a stored row decodes bit for bit to what ``load_split`` gives.
    """
    raw = open_source(cfg)
    start, stop = select(cfg, len(raw), raw.where)
    dtype, scale = raw.dtype, raw.scale
    if dtype == "float32" and _uint8_exact(raw, start, stop):
        dtype, scale = "uint8", 255.0
    info = SampleSetInfo(
        dataset=raw.dataset,
        split=cfg.split,
        shape=raw.shape,
        dtype=dtype,
        scale=scale,
        num_classes=len(raw.class_names),
        class_names=raw.class_names,
        preprocessing=raw.preprocessing,
        selection=selection,
    )
    source = _Source(info=info, groups=None)

    def groups(rows_per_group: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        h = hashlib.sha256()  # Split.fingerprint(): ids, then labels, then the float images, streamed
        h.update(np.ascontiguousarray(raw.ids[start:stop], dtype=np.int64))
        h.update(np.ascontiguousarray(raw.labels[start:stop], dtype=np.int64))
        for g0 in range(start, stop, rows_per_group):
            g1 = min(stop, g0 + rows_per_group)
            pixels = raw.rows(g0, g1)
            step = max(1, _FLOAT_SLICE_BYTES // (4 * pixels[0].size)) if len(pixels) else 1
            for lo in range(0, len(pixels), step):  # bounded float copies (a 224 px row group is 154 MB of floats)
                h.update(to_float(pixels[lo : lo + step], raw.dtype, raw.scale))
            if dtype != raw.dtype:  # float source proven k/255 exact
                pixels = np.round(pixels * np.float32(255.0)).astype(np.uint8)
            yield raw.ids[g0:g1], raw.labels[g0:g1], pixels
        source.split_fingerprint = h.hexdigest()[:16]

    source.groups = groups
    return source


# -- writing ----------------------------------------------------------------------------------------
def _versions(dataset: str) -> dict[str, str]:
    """Library versions that shaped the stored bytes (PIL's resampling makes ImageNet's pixels)."""
    names = ["pyarrow", "numpy", "torch", "torchvision"] + (["pillow"] if dataset == "imagenet" else [])
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _group_table(first: int, ids: np.ndarray, labels: np.ndarray, flat: np.ndarray) -> pa.Table:
    n, row_nbytes = flat.shape
    offsets = np.arange(0, (n + 1) * row_nbytes, row_nbytes, dtype=np.int32)
    images = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])
    columns = [
        _numeric(np.arange(first, first + n, dtype=np.int64), pa.int64()),
        _numeric(ids.astype(np.int64), pa.int64()),
        _numeric(labels.astype(np.int32), pa.int32()),
        images,
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _numeric(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A non-null Arrow array over a numpy buffer (``pa.array`` would import pandas to inspect it)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _write_parts(
    fs: pafs.FileSystem, folder: str, source: _Source, rows_per_group: int, groups_per_file: int, prefix: str = ""
) -> SampleSetInfo:
    """Stream the source's row groups into part files ``<folder>/<prefix>part-NNNNN.parquet``; returns the info
    with counts and fingerprints.

    Parts are written under their final names: the place is this preparer's own (a temporary folder renamed
    at the end, or a subfolder ``prefix`` that only the dataset.json this preparer writes names), so no reader
    sees a part before it is complete, and a failure leaves files only in that place, which the caller removes.
    """
    info = source.info
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(info.static(), sort_keys=True).encode()})
    whole = hashlib.sha256()
    parts: list[PartInfo] = []
    digests: list[str] = []
    writer = stream = None
    name = ""
    part_first = n = 0
    id_min = id_max = None
    last_id = None

    def close_part() -> None:
        writer.close()
        stream.close()
        size = fs.get_file_info(_join(folder, name)).size
        parts.append(PartInfo(name, part_first, n - part_first, int(size), tuple(digests)))

    try:
        for group_ids, group_labels, pixels in source.groups(rows_per_group):
            ids = np.asarray(group_ids, dtype=np.int64)
            labels = np.asarray(group_labels)
            if n % rows_per_group:  # positions -> row groups is pos // rows_per_group: only the last may be short
                raise RuntimeError(f"a short row group of {info.dataset} was not the last one")
            if labels.size and (labels.min() < _INT32.min or labels.max() > _INT32.max):
                raise DataError(f"{info.dataset}: labels do not fit in int32 (range {labels.min()}..{labels.max()})")
            if ids.size and ((last_id is not None and ids[0] <= last_id) or (np.diff(ids) <= 0).any()):
                raise DataError(f"{info.dataset}: sample ids are not strictly increasing")
            flat = np.ascontiguousarray(pixels, dtype=np.dtype(info.dtype).newbyteorder("<")).reshape(len(ids), -1)
            if flat.shape[1] != info.row_nbytes // flat.itemsize:
                raise DataError(f"{info.dataset}: an image has {flat.shape[1]} values, the set's shape is {info.shape}")
            flat = flat.view(np.uint8)
            if writer is None or len(digests) == groups_per_file:
                if writer is not None:
                    close_part()
                name = f"{prefix}part-{len(parts):05d}.parquet"
                stream = fs.open_output_stream(_join(folder, name))
                writer = pq.ParquetWriter(
                    stream,
                    schema,
                    compression="zstd",
                    use_dictionary=False,
                    write_statistics=["position", "sample_id", "label"],  # 150 kB min/max of pixels is useless
                )
                part_first, digests = n, []
            rec = _records(ids, labels, flat)
            whole.update(rec)
            digests.append(hashlib.sha256(rec).hexdigest())
            writer.write_table(_group_table(n, ids, labels, flat), row_group_size=rows_per_group)
            n += len(ids)
            id_min = int(ids[0]) if id_min is None else id_min
            id_max = last_id = int(ids[-1])
        if writer is None:
            raise DataError(f"the selection of {info.dataset} is empty")
        close_part()
    except BaseException:
        if writer is not None:  # failed mid-part: close what is open (the caller removes the folder)
            try:
                writer.close()
                stream.close()
            except (OSError, pa.ArrowException):
                pass
        raise
    return replace(
        info,
        num_rows=n,
        rows_per_group=rows_per_group,
        fingerprint=whole.hexdigest(),
        sample_id_min=id_min,
        sample_id_max=id_max,
        parts=tuple(parts),
        versions=_versions(info.dataset),
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )


def prepare_samples(
    cfg: DataConfig,
    dest: str | Path,
    *,
    rows_per_group: int = 256,
    groups_per_file: int | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> SampleSetInfo:
    """Store the samples ``cfg`` selects at ``dest`` once, so that workers read chunks instead of the driver
    holding (and shipping) every image; returns the set's description.

    ``dest`` is a folder: a local path, a URI (``file://``, ``s3://``, ``gs://``), or a path inside
    ``filesystem``. Choose ``rows_per_group`` equal to the evaluation's chunk size (or a divisor of it) so a
    chunk reads exactly its own rows. ``groups_per_file`` defaults to files of about 128 MB of pixels. A
    ``dest`` that already holds this selection is returned as it is (its own layout, nothing rewritten); one
    that holds anything else is an error, never overwritten.

    Safe when several processes prepare the same set at once (two runs starting together): each writes into a
    place of its own and publishes it in one step, the first to publish wins, and the others remove only what
    they wrote and return the winner's set. No preparer ever deletes or overwrites a folder or file it did not
    create.
    """
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group must be at least 1, got {rows_per_group}")
    if groups_per_file is not None and groups_per_file < 1:
        raise ValueError(f"groups_per_file must be at least 1, got {groups_per_file}")
    uri = str(dest)
    fs, root = _resolve(dest, filesystem)
    selection = json.loads(json.dumps(_selection(cfg)))  # JSON-normal: compares equal to a stored one
    existing = _existing(fs, root, uri, selection)
    if existing is not None:
        return existing
    source = _open_source(cfg, selection)  # DataError here, before anything is written
    if rows_per_group * source.info.row_nbytes > _INT32.max:
        raise ValueError(f"rows_per_group={rows_per_group} makes row groups over 2 GiB; use a smaller one")
    if groups_per_file is None:
        groups_per_file = max(1, TARGET_PART_BYTES // (rows_per_group * source.info.row_nbytes))
    layout = (rows_per_group, groups_per_file)
    if _renames_folders(fs):
        return _prepare_by_rename(fs, root, uri, selection, source, layout)
    return _prepare_in_subfolder(fs, root, uri, selection, source, layout)


def _prepare_by_rename(
    fs: pafs.FileSystem, root: str, uri: str, selection: dict[str, Any], source: _Source, layout: tuple[int, int]
) -> SampleSetInfo:
    """Write the whole set into a hidden sibling ``.<name>.tmp-<uuid>`` and rename it to ``root``.

    A folder rename is atomic and does not replace a non-empty folder, so the set appears complete or not at
    all, and when another preparer got there first the rename fails instead of replacing its set: this one
    then removes its own temporary folder (never ``root``) and returns the other set.
    """
    parent, _, name = root.rpartition("/")
    tmp = _join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    if parent:
        fs.create_dir(parent, recursive=True)
    fs.create_dir(tmp, recursive=True)
    try:
        info = _write_parts(fs, tmp, source, *layout)
        info = _finish(fs, tmp, uri, info, source)
        _write_atomic(fs, _join(tmp, INFO_FILE), _info_bytes(info))
        fs.move(tmp, root)  # replaces an empty folder only; fails when another preparer's set is there
    except BaseException as err:
        _remove_own(fs, tmp)
        done = _read_info(fs, root, uri) if isinstance(err, OSError) else None
        if done is None:
            raise
        return _adopt(fs, root, uri, done, selection)
    return info


def _prepare_in_subfolder(
    fs: pafs.FileSystem, root: str, uri: str, selection: dict[str, Any], source: _Source, layout: tuple[int, int]
) -> SampleSetInfo:
    """Object stores (no folder rename): write the parts under a subfolder of this preparer's own,
    ``root/p-<uuid>/``, then dataset.json, which names those parts, unless another preparer's is there already.

    dataset.json is the set: a reader opens only the parts it names, so two preparers never see or overwrite
    each other's parts. Reading dataset.json back after writing it tells who won; the loser removes its own
    subfolder and returns the winner's set. (Object stores offer no create-if-absent through pyarrow: two
    preparers checking at the same instant may both write dataset.json, the later write stands, and the
    earlier writer's parts stay unreferenced but complete: wasted space that ``store verify`` reports, never a
    set naming parts that are gone, since a preparer removes its parts only after reading another's
    dataset.json.)
    """
    own = f"p-{uuid.uuid4().hex[:16]}"
    folder = _join(root, own)
    fs.create_dir(folder, recursive=True)
    try:
        info = _write_parts(fs, root, source, *layout, prefix=f"{own}/")
        info = _finish(fs, root, uri, info, source)
        if _read_info(fs, root, uri) is None:
            _write_atomic(fs, _join(root, INFO_FILE), _info_bytes(info))
        done = _read_info(fs, root, uri)
    except BaseException:
        _remove_own(fs, folder)
        raise
    if done is not None and done.parts == info.parts:
        return done
    _remove_own(fs, folder)
    if done is None:
        raise DataError(f"{uri}/{INFO_FILE} vanished right after it was written: is another process removing sets?")
    return _adopt(fs, root, uri, done, selection)


def _remove_own(fs: pafs.FileSystem, folder: str) -> None:
    """Remove a folder this preparer created (its temporary folder or its part subfolder), nothing else."""
    try:
        if fs.get_file_info(folder).type != pafs.FileType.NotFound:
            fs.delete_dir(folder)
    except (OSError, pa.ArrowException):
        pass  # a leftover that `rcat-ray store verify` reports; never worth hiding the error that got us here


def _adopt(fs: pafs.FileSystem, root: str, uri: str, info: SampleSetInfo, selection: dict[str, Any]) -> SampleSetInfo:
    """The set another preparer finished at ``root`` while this one was writing, once it is checked to hold the
    same selection and all its parts (a different selection is an error, as for a set found at the start)."""
    if info.selection != selection:
        raise DataError(
            f"{uri} was filled with a different sample set while this one was being prepared "
            f"({json.dumps(info.selection, sort_keys=True)}; asked for {json.dumps(selection, sort_keys=True)})"
        )
    SampleSet(info, fs, root, uri).check_files()
    return info


def _existing(fs: pafs.FileSystem, root: str, uri: str, selection: dict[str, Any]) -> SampleSetInfo | None:
    """The set already at ``root`` when it holds this selection; None when there is none to reuse."""
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        return None
    if kind != pafs.FileType.Directory:
        raise DataError(f"{uri} exists and is not a folder: choose another destination for the sample set")
    info = _read_info(fs, root, uri)
    if info is None:
        if _renames_folders(fs) and fs.get_file_info(pafs.FileSelector(root)):
            raise NotASetError(
                f"{uri} exists, is not empty and has no {INFO_FILE}: it is not a sample set; "
                "choose another destination (nothing there is overwritten)"
            )
        return None  # empty folder, or an object-store leftover of an interrupted preparation
    if info.selection != selection:
        raise DataError(
            f"{uri} already holds a different sample set ({json.dumps(info.selection, sort_keys=True)}; "
            f"asked for {json.dumps(selection, sort_keys=True)}): a set is never overwritten, choose another "
            "destination"
        )
    SampleSet(info, fs, root, uri).check_files()
    return info


def _finish(fs: pafs.FileSystem, folder: str, uri: str, info: SampleSetInfo, source: _Source) -> SampleSetInfo:
    """Add ``Split.fingerprint()`` of the samples, computed by the source while it streamed them (the float
    images as ``load_split`` decodes them); every part's row count is checked against what was written."""
    if source.split_fingerprint is None:
        raise RuntimeError(f"the {info.dataset} source was not read to its end")
    sizes = fs.get_file_info([_join(folder, p.name) for p in info.parts])
    for part, fi in zip(info.parts, sizes, strict=True):
        if fi.type != pafs.FileType.File or fi.size != part.size:
            raise DataError(f"{uri}: part {part.name} was not written whole ({fi.size} of {part.size} bytes)")
    return replace(info, split_fingerprint=source.split_fingerprint)


def _info_bytes(info: SampleSetInfo) -> bytes:
    return (json.dumps(info.to_json(), indent=1, sort_keys=True) + "\n").encode()


# -- reading ----------------------------------------------------------------------------------------
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


@dataclass
class _Group:
    """One row group as stored: ids, labels and raw pixels (not yet float)."""

    ids: np.ndarray
    labels: np.ndarray
    flat: np.ndarray  # [n, row_nbytes] uint8

    @property
    def nbytes(self) -> int:
        """The stored pixel bytes: what a read cache counts (``iter_batches``' ``cache_bytes``, and the window
        size of ``rcat_ray.core.finetune_epoch.shuffle_window``); ids and labels, 16 bytes a row, are left out."""
        return self.flat.nbytes


class SampleSet:
    """A prepared sample set opened for reading: positions 0..N-1, read a range or batches at a time.

    Pickles as its description plus filesystem (no open files), so it can be sent to Ray workers; each
    worker then reads its own rows from storage. ``groups_read`` and ``bytes_read`` count the row groups this
    object has read and their stored pixel bytes (what was fetched, decompressed and hashed).
    """

    def __init__(self, info: SampleSetInfo, fs: pafs.FileSystem, root: str, uri: str):
        self.info = info
        self.filesystem = fs
        self.root = root
        self.uri = uri
        self._part_starts = [p.first_row for p in info.parts]
        self._footers: dict[int, pq.FileMetaData] = {}
        self.groups_read = 0
        self.bytes_read = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_footers": {}, "groups_read": 0, "bytes_read": 0}

    def __len__(self) -> int:
        return self.info.num_rows

    def __repr__(self) -> str:
        i = self.info
        return f"SampleSet({self.uri!r}, {i.dataset}/{i.split}, {i.num_rows} rows, {i.dtype} {i.shape})"

    @property
    def files(self) -> list[str]:
        """Paths of the part files in position order (for ``ray.data.read_parquet(files, filesystem=...)``)."""
        return [_join(self.root, p.name) for p in self.info.parts]

    def describe(self) -> dict[str, Any]:
        """Equal to ``Split.describe()`` of the same samples (see :meth:`SampleSetInfo.describe`)."""
        return self.info.describe()

    def _where(self, part: PartInfo) -> str:
        return f"{self.uri.rstrip('/')}/{part.name}"

    def _damaged(self, part: PartInfo, problem: str, sep: str = " ") -> DamagedSetError:
        return DamagedSetError(self.uri, part.name, problem, sep)

    def check_files(self) -> None:
        """Cheap check (one listing, no bytes read) that every part exists with the size dataset.json records."""
        infos = self.filesystem.get_file_info(self.files)
        for part, fi in zip(self.info.parts, infos, strict=True):
            problem = self._size_problem(part, fi)
            if problem:
                raise self._damaged(part, problem)

    @staticmethod
    def _size_problem(part: PartInfo, fi: pafs.FileInfo) -> str | None:
        if fi.type != pafs.FileType.File:
            return f"is missing (listed in {INFO_FILE})"
        if fi.size != part.size:
            return f"has {fi.size} bytes, {INFO_FILE} records {part.size} (truncated or replaced)"
        return None

    # -- row groups --------------------------------------------------------------------------------
    def _locate(self, group: int) -> tuple[int, int]:
        """(part index, row group inside the part) of a global row group."""
        pos = group * self.info.rows_per_group
        k = bisect.bisect_right(self._part_starts, pos) - 1
        return k, (pos - self._part_starts[k]) // self.info.rows_per_group

    def _read_groups(self, groups: Sequence[int], verify: bool = True, own: bool = False) -> dict[int, _Group]:
        """Read whole row groups (the unit Parquet stores), one request per part file, checking each group's
        sha256 against dataset.json when ``verify``. ``own``: each group gets its own copy of its pixels
        (otherwise they are views of the part's read buffer, which lives until every group read with it is
        dropped: a cache that drops groups one by one would free nothing)."""
        by_part: dict[int, list[tuple[int, int]]] = {}
        for g in sorted(set(groups)):
            k, local = self._locate(g)
            by_part.setdefault(k, []).append((g, local))
        out: dict[int, _Group] = {}
        rpg = self.info.rows_per_group
        for k, wanted in by_part.items():
            part = self.info.parts[k]
            path = _join(self.root, part.name)
            try:
                with self.filesystem.open_input_file(path) as f:
                    pf = pq.ParquetFile(f, metadata=self._footers.get(k))
                    self._check_footer(k, pf.metadata)
                    table = pf.read_row_groups([local for _, local in wanted])
            except FileNotFoundError:
                raise self._damaged(part, f"is missing (listed in {INFO_FILE})") from None
            except (OSError, pa.ArrowException) as err:  # a flipped byte: ZSTD or Thrift decode errors
                raise self._damaged(part, f"cannot be decoded ({err}): the file is damaged") from None
            row = 0
            for g, local in wanted:
                first = part.first_row + local * rpg
                n = min(rpg, part.first_row + part.num_rows - first)
                t = table.slice(row, n)
                row += n
                try:
                    out[g] = self._group(t, first, n, part, local, verify)
                except DamagedSetError:
                    raise
                except (DataError, ValueError, pa.ArrowException) as err:  # decodable, but not what was written
                    raise self._damaged(part, f"row group {local} holds unusable values ({err})", ": ") from None
                if own:
                    out[g].flat = out[g].flat.copy()
                self.groups_read += 1
                self.bytes_read += n * self.info.row_nbytes
        return out

    def _check_footer(self, k: int, md: pq.FileMetaData) -> None:
        part = self.info.parts[k]
        if k in self._footers:
            return
        rpg = self.info.rows_per_group
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        expected = [min(rpg, part.num_rows - i * rpg) for i in range(len(part.row_groups))]
        if md.num_rows != part.num_rows or sizes != expected:
            raise self._damaged(part, f"holds row groups of {sizes} rows, {INFO_FILE} records {expected}: the file "
                                "was replaced")  # fmt: skip
        self._footers[k] = md

    def _group(self, t: pa.Table, first: int, n: int, part: PartInfo, local: int, verify: bool) -> _Group:
        if not np.array_equal(t.column("position").to_numpy(), np.arange(first, first + n)):
            raise self._damaged(part, f"row group {local} does not hold positions {first}..{first + n - 1}")
        ids = t.column("sample_id").to_numpy().astype(np.int64)
        labels = t.column("label").to_numpy().astype(np.int64)
        flat = _binary_values(t.column("image"), self.info.row_nbytes)
        if verify and hashlib.sha256(_records(ids, labels, flat)).hexdigest() != part.row_groups[local]:
            raise self._damaged(
                part,
                f"row group {local} (positions {first}..{first + n - 1}) does not match the fingerprint in "
                f"{INFO_FILE} (the file was altered or damaged)",
                ": ",
            )
        return _Group(ids, labels, flat)

    def _check_range(self, start: int, stop: int) -> None:
        if not (0 <= start <= stop <= len(self)):
            raise IndexError(f"rows [{start}, {stop}) are outside the set's {len(self)} rows ({self.uri})")

    def _assemble(self, parts: list[tuple[_Group, np.ndarray | slice]]) -> Batch:
        """Gather rows (a group and row indices, or a slice, in it) into float images, int64 labels and ids.

        A chunk within one group (the usual case: chunks aligned with row groups) is decoded straight from a
        view of the group's pixels, so reading a chunk holds the stored bytes once and one float copy.
        """
        if len(parts) == 1:
            g, i = parts[0]
            flat, labels, ids = g.flat[i], g.labels[i], g.ids[i]  # views for a slice; the float decode copies
        elif parts:
            flat = np.concatenate([g.flat[i] for g, i in parts])
            labels = np.concatenate([g.labels[i] for g, i in parts])
            ids = np.concatenate([g.ids[i] for g, i in parts])
        else:
            flat = np.empty((0, self.info.row_nbytes), np.uint8)
            labels = ids = np.empty(0, np.int64)
        raw = flat.view(np.dtype(self.info.dtype).newbyteorder("<")).reshape(len(flat), *self.info.shape)
        images = to_float(raw, self.info.dtype, self.info.scale)
        return (
            torch.from_numpy(images),
            torch.from_numpy(np.array(labels, np.int64)),
            torch.from_numpy(np.array(ids, np.int64)),
        )

    # -- public reading ----------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int, *, verify: bool = True) -> Batch:
        """Positions [start, stop): (images float32 [n,C,H,W] in [0,1], labels int64, sample_ids int64).

        Reads only the row groups that hold these rows (a chunk aligned with ``rows_per_group`` reads exactly
        its own rows) and checks their sha256 unless ``verify`` is off.
        """
        self._check_range(start, stop)
        if start == stop:
            return self._assemble([])
        rpg = self.info.rows_per_group
        g0, g1 = start // rpg, (stop - 1) // rpg
        groups = self._read_groups(range(g0, g1 + 1), verify=verify)
        picks = []
        for g in range(g0, g1 + 1):
            lo, hi = max(start, g * rpg) - g * rpg, min(stop, (g + 1) * rpg) - g * rpg
            picks.append((groups[g], slice(lo, hi)))
        return self._assemble(picks)

    def iter_batches(
        self,
        batch_size: int,
        positions: Sequence[int] | np.ndarray | None = None,
        *,
        drop_last: bool = False,
        cache_bytes: int = 256 * 2**20,
        verify: bool = True,
        batch_sizes: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Batches of (images, labels, sample_ids) over ``positions`` (default: all, in order) for training.

        ``positions`` in any order (a shuffled permutation). Decoded row groups are kept in a cache of at most
        ``cache_bytes`` stored (uint8) bytes, counting the groups of the batch being read: since every position
        is known up front, a group is dropped right after the last batch that needs it, and when a batch needs
        room, the least recently used groups it does not need go first, before anything is read. A set that
        fits (Fashion-MNIST: 47 MB) is therefore read once per pass; a sequential pass, or an order shuffled
        within windows of row groups smaller than the cache (``rcat_ray.core.finetune_epoch.ShuffleWindow``), reads
        every group once whatever the set's size. A fully random order over a set far larger than the cache
        reads about one group per row. Only a single batch whose groups exceed the cache makes it overflow.
        ``batch_sizes`` (summing to the number of positions) gives each batch its own size instead, in one pass
        with one cache (a fine-tune's last global batch is often smaller than the others).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        pos = np.arange(len(self)) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"positions outside the set's {len(self)} rows ({self.uri})")
        if batch_sizes is None:
            bounds = np.arange(0, len(pos) + batch_size, batch_size).clip(max=len(pos))
            bounds = bounds[: int(np.searchsorted(bounds, len(pos))) + 1]
        else:
            bounds = np.concatenate([[0], np.cumsum(np.asarray(batch_sizes, dtype=np.int64))])
            if bounds[-1] != len(pos) or (np.diff(bounds) < 1).any():
                raise ValueError(f"batch_sizes must be positive and add up to the {len(pos)} positions")
        rpg = self.info.rows_per_group
        groups_of = pos // rpg
        # the batch after which each group is needed no more (its last occurrence: first in the reversed order)
        uniq, first_from_end = np.unique(groups_of[::-1], return_index=True)
        last_row = len(pos) - 1 - first_from_end
        last_batch = dict(zip(uniq.tolist(), (np.searchsorted(bounds, last_row, side="right") - 1).tolist(),
                              strict=True))  # fmt: skip
        cache: OrderedDict[int, _Group] = OrderedDict()
        held = 0
        for b in range(len(bounds) - 1):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            batch = pos[lo:hi]
            if drop_last and batch_sizes is None and len(batch) < batch_size:
                return
            gids = groups_of[lo:hi]
            needed = dict.fromkeys(gids.tolist())
            missing = [g for g in needed if g not in cache]
            if missing:
                incoming = sum(self._group_nbytes(g) for g in missing)
                for g in [g for g in cache if g not in needed]:  # least recently used first
                    if held + incoming <= cache_bytes:
                        break
                    held -= cache.pop(g).nbytes
                fresh = self._read_groups(missing, verify=verify, own=True)
                held += sum(grp.nbytes for grp in fresh.values())
                cache.update(fresh)
                del fresh  # the cache's references are the only ones: a group it drops is freed
            for g in needed:
                cache.move_to_end(g)
            out = self._assemble(
                [(cache[g], np.array([p - g * rpg])) for g, p in zip(gids.tolist(), batch.tolist(), strict=True)]
            )
            for g in needed:
                if last_batch[g] == b:
                    held -= cache.pop(g).nbytes
            yield out

    def _group_nbytes(self, group: int) -> int:
        """What :attr:`_Group.nbytes` will be for a global row group, before it is read."""
        rpg = self.info.rows_per_group
        rows = min(rpg, len(self) - group * rpg)
        return rows * self.info.row_nbytes

    def to_split(self, start: int = 0, stop: int | None = None) -> Split:
        """A ``Split`` of positions [start, stop): the bridge for code that still takes in-memory splits."""
        stop = len(self) if stop is None else stop
        images, labels, ids = self.read_rows(start, stop)
        return Split(
            dataset=self.info.dataset,
            split=self.info.split,
            images=images,
            labels=labels,
            sample_ids=ids,
            num_classes=self.info.num_classes,
            class_names=self.info.class_names,
        )

    def verify(self) -> None:
        """Recompute every row group's sha256 and the whole fingerprint (one streaming pass, one group held);
        DamagedSetError naming the first file that differs."""
        for err in self._damage():
            raise err

    def problems(self) -> list[tuple[str, str]]:
        """Every damaged file of the set as (name inside the set's folder, problem), reading every byte once:
        the thorough check of ``rcat-ray store verify``, which reports all files instead of stopping at one."""
        return [(err.name, err.problem) for err in self._damage()]

    def _damage(self) -> Iterator[DamagedSetError]:
        """What :meth:`verify` finds, file by file: a part that cannot be read is reported and the check moves on to
        the next part; the whole fingerprint is compared only when every part read."""
        whole = hashlib.sha256()
        clean = True
        sizes = self.filesystem.get_file_info(self.files)
        g = 0
        for part, fi in zip(self.info.parts, sizes, strict=True):
            groups = range(g, g + len(part.row_groups))
            g += len(part.row_groups)
            problem = self._size_problem(part, fi)
            if problem:
                clean = False
                yield self._damaged(part, problem)
                continue
            try:
                for group in groups:
                    grp = self._read_groups([group], verify=True)[group]
                    whole.update(_records(grp.ids, grp.labels, grp.flat))
            except DamagedSetError as err:
                clean = False
                yield err
        if clean and whole.hexdigest() != self.info.fingerprint:
            problem = f"the rows do not match the fingerprint in {INFO_FILE} (a part file was replaced)"
            yield DamagedSetError(self.uri, INFO_FILE, problem, ": ")

    def split_fingerprint(self) -> str:
        """``Split.fingerprint()`` of the whole set, streamed: ids, then labels (int64), then float32 images
        group by group, the byte order that method hashes."""
        h = hashlib.sha256()
        n_groups = sum(len(p.row_groups) for p in self.info.parts)
        for col in ("sample_id", "label"):
            for k, part in enumerate(self.info.parts):
                with self.filesystem.open_input_file(_join(self.root, part.name)) as f:
                    values = pq.ParquetFile(f).read(columns=[col]).column(col).to_numpy()
                self._check_part_rows(k, len(values))
                h.update(np.ascontiguousarray(values, dtype=np.int64))
        step = max(1, _FLOAT_SLICE_BYTES // (4 * int(np.prod(self.info.shape))))  # bounded float copies
        for g in range(n_groups):
            grp = self._read_groups([g], verify=True)[g]
            raw = grp.flat.view(np.dtype(self.info.dtype).newbyteorder("<")).reshape(len(grp.flat), *self.info.shape)
            for lo in range(0, len(raw), step):
                h.update(to_float(raw[lo : lo + step], self.info.dtype, self.info.scale))
        return h.hexdigest()[:16]

    def _check_part_rows(self, k: int, n: int) -> None:
        part = self.info.parts[k]
        if n != part.num_rows:
            raise self._damaged(part, f"holds {n} rows, {INFO_FILE} records {part.num_rows}")


def open_samples(uri: str | Path, *, filesystem: pafs.FileSystem | None = None, check: bool = True) -> SampleSet:
    """Open a prepared set (a local folder, a URI, or a path inside ``filesystem``) for reading.

    Cheap: reads dataset.json and lists the part files (sizes only; ``check=False`` skips that, for a checker
    that reports every damaged part through :meth:`SampleSet.problems` rather than stopping at the first).
    Pixels are checked against their fingerprints when they are read; :meth:`SampleSet.verify` checks everything.
    """
    uri = str(uri)
    fs, root = _resolve(uri, filesystem)
    info = _read_info(fs, root, uri)
    if info is None:
        kind = fs.get_file_info(root).type
        what = "does not exist" if kind == pafs.FileType.NotFound else f"has no {INFO_FILE}"
        raise DataError(
            f"{uri} {what}: it is not a prepared sample set (or its preparation did not finish); "
            "create it with prepare_samples"
        )
    samples = SampleSet(info, fs, root, uri)
    if check:
        samples.check_files()
    return samples


#: Folder of a result store that holds the prepared sample sets its evaluations and fine-tunes read.
SAMPLES_FOLDER = "samples"


def samples_location(store_uri: str, cfg: DataConfig) -> str:
    """Where a store keeps the set of a selection: ``<store>/samples/<hash of the selection>``.

    The result store is the one place every node of a cluster already reaches (shared storage or object
    storage), so a set prepared there by the driver is readable by every worker.
    """
    key = hashlib.sha256(json.dumps(_selection(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return f"{str(store_uri).rstrip('/')}/{SAMPLES_FOLDER}/{cfg.name}-{cfg.split}-{key}"


def samples_in_store(store_uri: str, cfg: DataConfig, *, rows_per_group: int = 256) -> SampleSet:
    """The selection's sample set in a result store, prepared on first use and reused after (no rewrite).

    A set found damaged by the cheap check (dataset.json unreadable or gone, a part missing or of the wrong
    size) is moved to the store's quarantine with a warning and prepared again, as a damaged table is rebuilt:
    every folder under ``samples/`` is the store's own, so moving one aside loses nothing. Damage inside a part
    (altered bytes of the right size) is found when the rows are read (each row group is hashed) and stops
    that run naming the file; ``rcat-ray store verify --repair`` then moves the set aside.
    """
    location = samples_location(store_uri, cfg)
    try:
        prepare_samples(cfg, location, rows_per_group=rows_per_group)
        return open_samples(location)
    except (DamagedSetError, NotASetError) as err:
        fs, store_root = _resolve(store_uri, None)
        rel = f"{SAMPLES_FOLDER}/{location.rsplit('/', 1)[1]}"
        root = _join(store_root, rel)
        if not _still_damaged(fs, root, location):
            if fs.get_file_info(root).type == pafs.FileType.NotFound:
                raise  # nothing stored is damaged: what this run was writing failed, say so
            return open_samples(location)  # another run repaired it meanwhile
        set_aside(fs, store_root, rel, f"damaged sample set: {err}")
    prepare_samples(cfg, location, rows_per_group=rows_per_group)
    return open_samples(location)


def _still_damaged(fs: pafs.FileSystem, root: str, uri: str) -> bool:
    """Checked again right before moving a set aside, so a run that finds damage another run has already
    repaired (moved aside and prepared again) does not move the fresh set."""
    try:
        info = _read_info(fs, root, uri)
        if info is not None:
            SampleSet(info, fs, root, uri).check_files()
            return False
    except DataError:
        return True
    # no dataset.json: damage on a local disk (a set appears there whole, by a rename); on an object store,
    # where parts come first, possibly another preparer at work, whose files must not move
    return _renames_folders(fs) and bool(fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)))


def set_aside(fs: pafs.FileSystem, store_root: str, rel: str, reason: str) -> str | None:
    """Move a folder of a result store (a damaged sample set) to ``quarantine/<UTC time>/<rel>`` with a warning;
    returns where it went (store-relative), None when it is gone already (another process moved it).

    Moved, never deleted, like a damaged table: it can still be inspected, and a false alarm loses nothing.
    Object stores have no folder rename, so there the files move one by one.
    """
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    dest_rel = f"{QUARANTINE_FOLDER}/{stamp}/{rel}"
    src, dest = _join(store_root, rel), _join(store_root, dest_rel)
    try:
        if _renames_folders(fs):
            fs.create_dir(dest.rpartition("/")[0], recursive=True)
            fs.move(src, dest)
        else:
            files = fs.get_file_info(pafs.FileSelector(src, recursive=True))
            for fi in (f for f in files if f.type == pafs.FileType.File):
                target = _join(dest, fi.path[len(src) :].lstrip("/"))
                fs.create_dir(target.rpartition("/")[0], recursive=True)
                fs.move(fi.path, target)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot move the damaged sample set {src} aside: {err}") from None
    log.warning("%s. Moved to %s", reason, dest)
    return dest_rel
