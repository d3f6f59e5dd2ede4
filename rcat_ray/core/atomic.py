"""The one way a local file is written: under a unique temporary name in its folder, then renamed into place.

A reader sees the old file or the new one, never half of one, and two writers of one path never interleave
(each has its own temporary file; the last rename wins with a whole file).
"""

from __future__ import annotations

import uuid
from pathlib import Path


def write_file_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (checkpoints, reports, verdicts, manifests); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
