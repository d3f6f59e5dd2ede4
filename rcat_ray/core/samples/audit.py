"""Checks of a whole sample set, every byte read once: ``verify`` (stop at the first damage), ``problems`` (every
damaged file, for ``rcat-ray store verify``) and ``split_fingerprint`` (the set's ``Split.fingerprint()``, streamed).

A mixin of :class:`~rcat_ray.core.samples.read.SampleSet`, kept apart from the reading paths that workers use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from rcat_ray.core.samples.format import _FLOAT_SLICE_BYTES, INFO_FILE, _join, _records
from rcat_ray.core.sources import to_float
from rcat_ray.errors import DamagedSetError


class WholeSetChecks:
    """Whole-set checks over the reader's row groups (``_read_groups``) and part listing (``files``)."""

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
