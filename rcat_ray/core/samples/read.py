"""Reading a sample set: a range of positions, or training batches through a bounded row-group cache.

Every row group read is checked against its sha256 in dataset.json, so a worker that reads one chunk checks
exactly the bytes it read; :meth:`SampleSet.verify` checks the whole set. Decoded rows are bit-identical to
what ``load_split`` gives, so per-sample tables and their cache keys do not depend on which path read them.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from rcat_ray.core.data import Split
from rcat_ray.core.samples.audit import WholeSetChecks
from rcat_ray.core.samples.format import (
    INFO_FILE,
    Batch,
    PartInfo,
    SampleSetInfo,
    _binary_values,
    _join,
    _read_info,
    _records,
    _resolve,
)
from rcat_ray.core.sources import to_float
from rcat_ray.errors import DamagedSetError, DataError


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


class SampleSet(WholeSetChecks):
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
            raise self._damaged(
                part, f"holds row groups of {sizes} rows, {INFO_FILE} records {expected}: the file was replaced"
            )
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
        last_batch = dict(
            zip(uniq.tolist(), (np.searchsorted(bounds, last_row, side="right") - 1).tolist(), strict=True)
        )
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
