"""The result store: content-addressed artifacts, atomic writes, a manifest beside each artifact.

The store is a directory on any filesystem pyarrow understands (a local path, ``s3://...``, ``gs://...``),
so every node of a cluster can write finished chunks into the same place. Artifacts are addressed by
a hash of everything that determines their content; a file is written under a temporary name and then
renamed, and an existing artifact is never rewritten, so an interrupted or failing run cannot damage
earlier results.

Layout::

    tables/<key>/chunks/chunk-000007.parquet   one finished work unit (written by a Ray worker)
    tables/<key>/chunks/adv-000007.npz         its adversarial images (optional, for reports)
    tables/<key>/table.parquet                 the per-model table, assembled once every chunk exists
    tables/<key>/manifest.json                 config, versions, model and data fingerprints
    comparisons/<key>/{flips.parquet, summary.json, manifest.json}
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import platform
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StoreError(RuntimeError):
    """The store cannot be used (unwritable, unreachable, or an artifact is damaged)."""


_VERSIONED = ("rcat_ray", "torch", "torchvision", "ray", "pyautoattack", "robustbench", "numpy", "pyarrow")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape a result, for manifests."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_file_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write a local file under a temporary name in its folder, then rename it into place: a reader sees the
    old file or the new one, never half of one (reports, verdicts, tables, manifests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
    return path


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class ResultStore:
    """A directory of artifacts on a pyarrow filesystem, written atomically and never overwritten."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        self.uri = uri

    # -- paths -------------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def local_path(self, rel: str) -> Path | None:
        """The on-disk path of an artifact when the store is local (for reports and users)."""
        return Path(self.path(rel)) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def list_files(self, rel_dir: str) -> list[str]:
        """Names of the files directly inside a folder (empty if the folder does not exist)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.File)

    # -- checks ------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail early, before any compute, when results could not be saved."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            self._write_atomic(probe, b"ok")
            self.fs.delete_file(self.path(probe))
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"result store {self.uri} is not writable: {err}") from None

    # -- writing -----------------------------------------------------------------------------------
    def _write_atomic(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, final)

    def put_bytes(self, rel: str, data: bytes) -> bool:
        """Write an artifact unless it already exists (content addressing makes it identical)."""
        if self.exists(rel):
            return False
        self._write_atomic(rel, data)
        return True

    def put_table(self, rel: str, table: pa.Table, metadata_: dict[str, Any] | None = None) -> bool:
        """Write a Parquet artifact; ``metadata_`` goes into the file's key-value metadata as JSON."""
        if metadata_:
            meta = dict(table.schema.metadata or {})
            meta[b"rcat_ray"] = json.dumps(metadata_, sort_keys=True, default=str).encode()
            table = table.replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.put_bytes(rel, buf.getvalue())

    def put_json(self, rel: str, obj: Any) -> bool:
        return self.put_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False).encode())

    # -- reading -----------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"missing artifact {self.path(rel)}") from None

    def read_table(self, rel: str) -> pa.Table:
        try:
            return pq.read_table(self.path(rel), filesystem=self.fs)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"cannot read table {self.path(rel)}: {err}") from None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))


def table_metadata(table: pa.Table) -> dict[str, Any]:
    """The rcat_ray metadata a Parquet artifact carries (empty if none)."""
    raw = (table.schema.metadata or {}).get(b"rcat_ray")
    return json.loads(raw) if raw else {}
