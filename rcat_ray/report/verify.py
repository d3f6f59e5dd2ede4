"""Whether a result store is intact, and its repair: :func:`verify_store` for ``rcat-ray store verify``.

Every table, chunk and comparison is checked against the sha256 its manifest records and every prepared
sample set against the row-group hashes of its dataset.json, reading every byte (the thorough check, unlike
the cheap one a resumed run does). With ``repair`` damaged artifacts and sets are moved to
``quarantine/<UTC time>/`` so the next run recomputes them, and temporary folders of killed preparations are
removed; without it nothing is written, moved or created. Returns plain JSON-able findings, never prints.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from rcat_ray.core.samples import INFO_FILE, SAMPLES_FOLDER, open_samples, set_aside
from rcat_ray.errors import DamagedArtifactError, DamagedSetError, DataError, UncheckedArtifactError
from rcat_ray.evaluate.chunks import CHUNK_MANIFEST, TABLE_MEMBERS, chunk_file_names
from rcat_ray.evaluate.comparison import COMPARISON_MEMBERS
from rcat_ray.store.result_store import ResultStore


def as_store(store: ResultStore | str | Path) -> ResultStore:
    """A store given as itself or by its location."""
    return store if isinstance(store, ResultStore) else ResultStore(store)


def verify_store(store: ResultStore | str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Check every artifact of the store against its manifest; an empty list means the store is intact.

    Each finding is ``{"status", "kind", "key", "path", "problem", "moved_to"}`` (paths relative to the store
    root; ``kind`` is table, chunk, comparison or samples, whose ``key`` is the set's folder name under
    ``samples/``). ``status``:

    * ``damaged``: bytes or manifest do not check out; repair moves the whole artifact (a whole set) aside;
    * ``orphan``: a file no manifest covers (left by an interrupted write); repair moves it aside; or a folder
      a killed preparation of a sample set left (its temporary folder, or parts no dataset.json names); repair
      removes it (those files are half-written or unused, and were never part of a set) and says so in
      ``removed``;
    * ``missing``: a chunk of a finished table is absent; the next evaluation recomputes it (nothing to move);
    * ``unverifiable``: written before checksums existed; left alone (this version never reuses it).

    Reads every stored byte once. Without ``repair`` the store is not touched at all. Incomplete evaluations
    (chunks, no table yet) are normal and not reported. Repair while no evaluation writes to the store: a
    chunk being written looks like an orphan until its manifest lands (moving it is safe, the chunk is then
    recomputed, but that is wasted work).
    """
    store = as_store(store)
    findings: list[dict[str, Any]] = []
    for key in store.list_dirs("tables"):
        findings += _verify_table(store, key, repair)
    for key in store.list_dirs("comparisons"):
        folder = f"comparisons/{key}"
        found, covered = _verify_artifact(store, "comparison", key, folder, "manifest.json", COMPARISON_MEMBERS, repair)
        findings += found + _orphans(store, "comparison", key, folder, covered, repair)
    for name in store.list_dirs(SAMPLES_FOLDER):
        findings += _verify_samples(store, name, repair)
    return findings


def _finding(status: str, kind: str, key: str, path: str, problem: str, moved: list[str] | None = None) -> dict:
    return {"status": status, "kind": kind, "key": key, "path": path, "problem": problem, "moved_to": moved or []}


def _verify_samples(store: ResultStore, name: str, repair: bool) -> list[dict[str, Any]]:
    """Findings for one folder under ``samples/``: a set read whole through its row-group hashes, or a temporary
    folder of a preparation that never finished (a finished one is renamed away)."""
    folder = f"{SAMPLES_FOLDER}/{name}"
    if name.startswith(".") and ".tmp-" in name:
        key = name[1:].split(".tmp-", 1)[0]
        problem = "temporary folder of a sample set preparation that did not finish (killed); repair removes it"
        return [_removable(store, "samples", key, folder, problem, repair)]
    if not store.list_files(folder) and not store.list_dirs(folder):
        return []  # an empty folder (an object store's leftover of a set moved aside): nothing stored
    try:
        samples = open_samples(store.path(folder), filesystem=store.fs, check=False)
        problems = [(f"{folder}/{file}", problem) for file, problem in samples.problems()]
    except DamagedSetError as err:
        problems = [(f"{folder}/{err.name}", err.problem)]
    except DataError as err:  # no dataset.json, or a format this version does not read
        if store.exists(f"{folder}/{INFO_FILE}"):
            return [_finding("unverifiable", "samples", name, f"{folder}/{INFO_FILE}", str(err))]
        problems = [(f"{folder}/{INFO_FILE}", "missing: the folder is not a complete sample set")]
    if problems:
        moved = []
        if repair:
            reason = "damaged sample set: " + "; ".join(f"{store.path(r)}: {p}" for r, p in problems)
            where = set_aside(store.fs, store.root, folder, reason)
            moved = [where] if where else []
        return [_finding("damaged", "samples", name, path, problem, moved) for path, problem in problems]
    owned = {p.name.split("/", 1)[0] for p in samples.info.parts if "/" in p.name}
    problem = "parts of a preparation that lost the race or was killed (its dataset.json is not the set's)"
    return [
        _removable(store, "samples", name, f"{folder}/{sub}", f"{problem}; repair removes them", repair)
        for sub in store.list_dirs(folder)
        if sub not in owned and not sub.startswith(".")
    ]


def _removable(store: ResultStore, kind: str, key: str, rel: str, problem: str, repair: bool) -> dict[str, Any]:
    """An orphan folder that is safe to delete because no set refers to it; deleted on ``repair``."""
    finding = _finding("orphan", kind, key, rel, problem)
    if repair:
        with contextlib.suppress(FileNotFoundError):  # removed by its own preparer meanwhile
            store.fs.delete_dir(store.path(rel))
        finding["removed"] = True
    return finding


def _verify_table(store: ResultStore, key: str, repair: bool) -> list[dict[str, Any]]:
    folder, chunks = f"tables/{key}", f"tables/{key}/chunks"
    findings, covered = _verify_artifact(store, "table", key, folder, "manifest.json", TABLE_MEMBERS, repair)
    names = store.list_files(chunks)
    chunk_ids = sorted(int(m.group(1)) for m in map(CHUNK_MANIFEST.match, names) if m)
    chunk_covered: set[str] = set()
    for chunk_id in chunk_ids:
        manifest_name, *members = chunk_file_names(chunk_id)
        found, names_ = _verify_artifact(store, "chunk", key, chunks, manifest_name, members, repair)
        findings += found
        chunk_covered |= names_
    findings += _orphans(store, "table", key, folder, covered, repair)
    if any(f["status"] == "unverifiable" for f in findings):
        return findings  # an older layout: its chunks have no manifests, and are not orphans of a crash
    findings += _orphans(store, "chunk", key, chunks, chunk_covered, repair, names=names)
    n_chunks = _expected_chunks(store, folder)
    if n_chunks is not None:  # a finished table keeps all its chunks (they hold the adversarial images)
        for chunk_id in sorted(set(range(n_chunks)) - set(chunk_ids)):
            path = f"{chunks}/{chunk_file_names(chunk_id)[0]}"
            problem = "chunk of a finished table is absent; the next evaluation of this model recomputes it"
            findings.append(_finding("missing", "chunk", key, path, problem))
    return findings


def _expected_chunks(store: ResultStore, folder: str) -> int | None:
    """How many chunks a finished table has, from its manifest (None when unfinished or unreadable)."""
    try:
        manifest = store.read_manifest(f"{folder}/manifest.json")
        if manifest is None:
            return None
        return -(-int(manifest["data"]["n_samples"]) // int(manifest["chunk_size"]))
    except (DamagedArtifactError, TypeError, KeyError, ValueError, ZeroDivisionError):
        return None


def _verify_artifact(
    store: ResultStore,
    kind: str,
    key: str,
    folder: str,
    manifest_name: str,
    members: tuple[str, ...] | list[str],
    repair: bool,
) -> tuple[list[dict[str, Any]], set[str]]:
    """Findings for one artifact, and the names of the files it covers (the others in its folder are orphans)."""
    rel = f"{folder}/{manifest_name}"
    try:
        store.read_manifest(rel)
    except UncheckedArtifactError:
        problem = "written before checksums existed (an older rcat_ray): cannot be verified, never reused"
        return [_finding("unverifiable", kind, key, rel, problem)], {manifest_name, *members}
    except DamagedArtifactError:
        pass  # check_artifact reports it
    manifest, problems = store.check_artifact(folder, manifest_name)  # every file hashed
    if manifest is None and not problems:
        return [], set()  # not done yet
    covered = {manifest_name, *(manifest["files"] if manifest else members)}
    moved: list[str] = []
    if problems and repair:
        moved = store.quarantine_artifact(folder, manifest_name, members, problems, manifest)
    return [_finding("damaged", kind, key, path, problem, moved) for path, problem in problems], covered


def _orphans(
    store: ResultStore,
    kind: str,
    key: str,
    folder: str,
    covered: set[str],
    repair: bool,
    names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Files no manifest covers (temporary files of writes in flight are skipped: they may be someone's)."""
    names = store.list_files(folder) if names is None else names
    findings = []
    for name in names:
        if name in covered or name.startswith("."):
            continue
        rel = f"{folder}/{name}"
        if store.size(rel) is None:
            continue  # moved with its artifact a moment ago
        problem = f"{kind} file without a manifest (left by an interrupted run); the next run recomputes it"
        moved = store.quarantine([rel], f"{store.path(rel)}: {problem}") if repair else []
        findings.append(_finding("orphan", kind, key, rel, problem, moved))
    return findings
