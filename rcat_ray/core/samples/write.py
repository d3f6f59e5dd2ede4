"""Writing a sample set: stream a selection into part files and publish it atomically, never overwriting.

On a local filesystem the set is written into a hidden sibling folder and renamed to ``dest`` at the end (the
folder appears complete or not at all); object stores have no folder rename, so there each preparer writes
its parts under a subfolder of its own and dataset.json, written last, names them. Two preparers racing end
with one set, and neither deletes anything the other wrote (see :func:`prepare_samples`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rcat_ray.config import DataConfig
from rcat_ray.core.atomic import temporary_name, write_file_atomic
from rcat_ray.core.samples.format import (
    _INT32,
    INFO_FILE,
    META_KEY,
    SCHEMA,
    TARGET_PART_BYTES,
    PartInfo,
    SampleSetInfo,
    _info_bytes,
    _join,
    _read_info,
    _records,
    _renames_folders,
    _resolve,
)
from rcat_ray.core.samples.read import SampleSet
from rcat_ray.core.samples.source import _open_source, _selection, _Source
from rcat_ray.errors import DataError, NotASetError


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
    parent = root.rpartition("/")[0]
    tmp = temporary_name(root)
    if parent:
        fs.create_dir(parent, recursive=True)
    fs.create_dir(tmp, recursive=True)
    try:
        info = _write_parts(fs, tmp, source, *layout)
        info = _finish(fs, tmp, uri, info, source)
        write_file_atomic(_join(tmp, INFO_FILE), _info_bytes(info), filesystem=fs)
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
            write_file_atomic(_join(root, INFO_FILE), _info_bytes(info), filesystem=fs)
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
