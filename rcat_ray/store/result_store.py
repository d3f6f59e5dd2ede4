"""The result store: content-addressed artifacts, atomic writes, checksummed manifests.

A directory on any filesystem pyarrow understands (a local path, ``s3://...``, ``gs://...``) that every node
of a cluster writes finished chunks into. Artifacts are addressed by a hash of everything that determines
their content and are never rewritten; every manifest records the sha256 and size of the files beside it and
is written last, so an artifact is *done* when its manifest exists and every file it lists matches. A file
that fails its check is moved, with its artifact, to ``quarantine/<UTC time>/<its path>`` (never deleted) and
the artifact is recomputed. Layout (``tables/``, ``comparisons/``, ``samples/``, ``quarantine/``) and keys:
docs/architecture.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import platform
import uuid
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.errors import DamagedArtifactError, StoreError, UncheckedArtifactError

log = logging.getLogger(__name__)

#: Folder (relative to the store root) that receives damaged artifacts.
QUARANTINE_DIR = "quarantine"


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


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def file_record(data: bytes) -> dict[str, Any]:
    """What a manifest records about one file: enough to tell a truncated or altered copy from the original."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def parquet_bytes(table: pa.Table, metadata_: Mapping[str, Any] | None = None) -> bytes:
    """A table serialised as the store writes it; ``metadata_`` goes into the file's key-value metadata as JSON.

    Serialising before writing is what lets a manifest record the checksum of the exact bytes stored.
    """
    if metadata_:
        meta = dict(table.schema.metadata or {})
        meta[b"rcat_ray"] = json.dumps(metadata_, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    """JSON as the store writes it (sorted, indented, no NaN: a NaN in a summary is a bug, not a value)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False).encode()


def bytes_problem(data: bytes, record: Mapping[str, Any]) -> str | None:
    """Why ``data`` is not the file ``record`` describes, or None when it is."""
    if len(data) != record.get("size"):
        return f"size {len(data)} bytes, the manifest records {record.get('size')} (truncated or altered)"
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return "sha256 differs from the manifest (the file was altered)"
    return None


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

    def size(self, rel: str) -> int | None:
        """Size in bytes of a file, None when there is none (a cheap check: no bytes are read)."""
        info = self.fs.get_file_info(self.path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def list_files(self, rel_dir: str) -> list[str]:
        """Names of the files directly inside a folder (empty if the folder does not exist)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.File)

    def list_dirs(self, rel_dir: str) -> list[str]:
        """Names of the folders directly inside a folder (empty if the folder does not exist)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(rel_dir), allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.Directory)

    # -- checks ------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail early, before any compute, when results could not be saved."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            write_file_atomic(self.path(probe), b"ok", filesystem=self.fs)
            self.fs.delete_file(self.path(probe))
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"result store {self.uri} is not writable: {err}") from None

    # -- writing -----------------------------------------------------------------------------------
    def put_bytes(self, rel: str, data: bytes) -> bool:
        """Write an artifact unless it already exists (content addressing makes it identical)."""
        if self.exists(rel):
            return False
        write_file_atomic(self.path(rel), data, filesystem=self.fs)
        return True

    def put_table(self, rel: str, table: pa.Table, metadata_: dict[str, Any] | None = None) -> bool:
        """Write a Parquet artifact; ``metadata_`` goes into the file's key-value metadata as JSON."""
        return self.put_bytes(rel, parquet_bytes(table, metadata_))

    def put_json(self, rel: str, obj: Any) -> bool:
        return self.put_bytes(rel, json_bytes(obj))

    def write_member(self, rel: str, data: bytes) -> dict[str, Any]:
        """Write one file of an artifact whose manifest is not written yet; returns its manifest record.

        A file already at ``rel`` is not covered by any manifest (the caller only writes artifacts that are
        not done), so it is a leftover of an interrupted run: kept when it holds exactly these bytes (nothing
        is rewritten), otherwise moved aside first, so the manifest written next describes what is stored.
        """
        record = file_record(data)
        existing = self.size(rel)
        if existing is not None:
            if existing == len(data) and bytes_problem(self.read_bytes(rel), record) is None:
                return record
            leftover = f"{self.path(rel)} has no manifest (left by an interrupted run) and differs from the new one"
            self.quarantine([rel], leftover)
        write_file_atomic(self.path(rel), data, filesystem=self.fs)
        return record

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

    # -- integrity ---------------------------------------------------------------------------------
    def read_manifest(self, rel: str) -> dict[str, Any] | None:
        """A manifest with file checksums; None when there is none yet (the artifact is not done).

        Raises DamagedArtifactError when it cannot be parsed or records no checksums: nothing it covers can
        then be trusted.
        """
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(raw)
        except ValueError as err:
            raise DamagedArtifactError(rel, f"unreadable manifest ({err})", self.uri) from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise UncheckedArtifactError(rel, "the manifest records no file checksums", self.uri)
        return manifest

    def read_verified(self, folder: str, name: str, manifest: Mapping[str, Any]) -> bytes:
        """The bytes of ``folder/name``, checked against the sha256 and size ``manifest`` records for it.

        Hashing on read costs one pass over bytes that are being read anyway; it is what stops a truncated
        or altered file from being reused only because it exists.
        """
        rel = f"{folder}/{name}"
        record = manifest["files"].get(name)
        if record is None:
            raise DamagedArtifactError(rel, "not listed in its manifest", self.uri)
        try:
            data = self.read_bytes(rel)
        except StoreError:
            raise DamagedArtifactError(rel, "missing (its manifest lists it)", self.uri) from None
        problem = bytes_problem(data, record)
        if problem:
            raise DamagedArtifactError(rel, problem, self.uri)
        return data

    def check_member(self, folder: str, name: str, manifest: Mapping[str, Any], *, full: bool = True) -> str | None:
        """Why ``folder/name`` does not match its manifest, or None. ``full=False`` only compares the size
        (no bytes read): the cheap check for large files that are hashed whenever they are actually read."""
        if full:
            try:
                self.read_verified(folder, name, manifest)
            except DamagedArtifactError as err:
                return err.problem
            return None
        record = manifest["files"].get(name) or {}
        size = self.size(f"{folder}/{name}")
        if size is None:
            return "missing (its manifest lists it)"
        if size != record.get("size"):
            return f"size {size} bytes, the manifest records {record.get('size')} (truncated or altered)"
        return None

    def check_artifact(
        self, folder: str, manifest_name: str = "manifest.json", *, size_only: tuple[str, ...] = ()
    ) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
        """Check every file a manifest lists; returns (manifest or None, [(store-relative path, problem)]).

        No manifest means the artifact is not done (no problems); an unreadable one is itself the problem.
        Files whose names end with one of ``size_only`` are only compared by size: large optional files
        (adversarial images) that are hashed when they are actually read.
        """
        rel = f"{folder}/{manifest_name}"
        try:
            manifest = self.read_manifest(rel)
        except DamagedArtifactError as err:
            return None, [(rel, err.problem)]
        if manifest is None:
            return None, []
        problems = []
        for name in sorted(manifest["files"]):
            problem = self.check_member(folder, name, manifest, full=not (size_only and name.endswith(size_only)))
            if problem:
                problems.append((f"{folder}/{name}", problem))
        return manifest, problems

    def quarantine_artifact(
        self,
        folder: str,
        manifest_name: str,
        members: Iterable[str],
        problems: Iterable[tuple[str, str]],
        manifest: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Move a damaged artifact aside as a whole: its manifest, the files it lists and its usual ``members``.

        The whole artifact goes, not only the bad file, because the manifest is the artifact's "done" marker: a
        manifest left behind would describe files that are no longer there, and a good file left behind would
        be mistaken for a leftover by the run that recomputes the artifact.
        """
        listed = [n for n in (manifest or {}).get("files", {}) if "/" not in n and n not in ("", ".", "..")]
        names = list(dict.fromkeys([manifest_name, *members, *listed]))
        reason = "damaged artifact: " + "; ".join(f"{self.path(r)}: {p}" for r, p in problems)
        return self.quarantine([f"{folder}/{n}" for n in names], reason)

    def quarantine(self, rels: Iterable[str], reason: str) -> list[str]:
        """Move files aside to ``quarantine/<UTC time>/<their path>`` with a warning; returns where they went.

        Files are moved, never deleted: a damaged artifact can still be inspected, and a false alarm loses
        nothing. Absent files are skipped (another process may have moved them already). The files of one
        call share one timestamped folder, so an artifact's files stay together.
        """
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = []
        for rel in rels:
            if self.size(rel) is None:
                continue
            dest = f"{QUARANTINE_DIR}/{stamp}/{rel}"
            try:
                self.fs.create_dir(self.path(dest).rsplit("/", 1)[0], recursive=True)
                self.fs.move(self.path(rel), self.path(dest))
            except FileNotFoundError:
                continue  # moved by a concurrent reader
            except (OSError, pa.ArrowException) as err:
                raise StoreError(f"cannot move damaged artifact {self.path(rel)} aside: {err}") from None
            moved.append(dest)
        if moved:
            names = ", ".join(m.split("/", 2)[2] for m in moved)
            log.warning("%s. Moved to %s: %s", reason, self.path(f"{QUARANTINE_DIR}/{stamp}"), names)
        return moved


def table_metadata(table: pa.Table) -> dict[str, Any]:
    """The rcat_ray metadata a Parquet artifact carries (empty if none)."""
    raw = (table.schema.metadata or {}).get(b"rcat_ray")
    return json.loads(raw) if raw else {}


def table_from_bytes(data: bytes) -> pa.Table:
    """A Parquet table from verified bytes (no second read of the file).

    Decoded on the calling thread: with pyarrow 26, a threaded read of an in-memory file leaves a pool thread
    that aborts the interpreter at exit now and then ("terminate called without an active exception", exit
    134 after correct output); these tables are small, so threads gain nothing.
    """
    return pq.read_table(pa.BufferReader(data), use_threads=False)
