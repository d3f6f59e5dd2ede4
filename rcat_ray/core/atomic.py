"""The one way a file is written: under a temporary name in its folder, then renamed into place.

A reader sees the old file or the new one, never half of one, and two writers of one path never interleave
(each has its own temporary file; the last rename wins with a whole file). Works on a local path or on any
pyarrow filesystem (the result store, sample sets). Temporary names are ``.<final name>.tmp-<uuid>``: hidden
from dataset readers, and :func:`final_name` tells which file one was meant to become.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

_TMP = ".tmp-"


def temporary_name(path: str) -> str:
    """A fresh temporary name beside ``path`` (a ``/``-separated path): ``<folder>/.<name>.tmp-<uuid>``."""
    parent, sep, name = str(path).rpartition("/")
    return f"{parent}{sep}.{name}{_TMP}{uuid.uuid4().hex}"


def final_name(name: str) -> str | None:
    """The file name a temporary name stands in for (``.x.tmp-<uuid>`` gives ``x``); None for any other name."""
    if name.startswith(".") and _TMP in name:
        return name[1:].rsplit(_TMP, 1)[0]
    return None


def _place(path: str | Path, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is None:
        return pafs.LocalFileSystem(), Path(path).absolute().as_posix()
    return filesystem, str(path)


@contextlib.contextmanager
def atomic_output(path: str | Path, *, filesystem: pafs.FileSystem | None = None) -> Iterator[pa.NativeFile]:
    """A stream to write ``path`` through (local, or inside ``filesystem``); the file appears when the block
    ends without an error, and the temporary file is removed when it raises."""
    fs, final = _place(path, filesystem)
    parent = final.rpartition("/")[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = temporary_name(final)
    try:
        with fs.open_output_stream(tmp, compression=None) as out:
            yield out
        fs.move(tmp, final)
    except BaseException:  # a full disk, a folder that went away: no half-written file stays behind
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


def write_file_atomic(path: str | Path, data: bytes | str, *, filesystem: pafs.FileSystem | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (checkpoints, reports, verdicts, manifests, store artifacts)."""
    with atomic_output(path, filesystem=filesystem) as out:
        out.write(data.encode() if isinstance(data, str) else data)
    return Path(path)
