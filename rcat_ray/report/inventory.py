"""What a result store holds, and whether it is intact: plain functions for the CLI and for scripts.

* ``verify_store(store, repair)`` checks every table, chunk and comparison against the sha256 its manifest
  records, and every prepared sample set against the row-group hashes its dataset.json records (reading every
  byte: the thorough check, unlike the cheap one a resumed run does) and returns findings; with ``repair``
  damaged artifacts and sets are moved to ``quarantine/<UTC time>/`` (see ``store.result_store``) so the next run
  recomputes them, and temporary folders left by killed preparations are removed. Without ``repair`` nothing
  is written, moved or created.
* ``list_entries(store)`` lists tables and comparisons from their manifests (no hashing).
* ``resolve_key(store, prefix, kind)`` turns any unique key prefix (or an artifact's folder) into a key.
* ``describe_entry(store, key)`` gives a table's clean and robust accuracy, or a comparison's metrics with
  their confidence intervals, read through the checksums.

They return plain JSON-able data (dicts, lists, strings), never print, and raise ``StoreError`` with a message
meant for the user.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rcat_ray.core.flips import METRICS
from rcat_ray.core.samples import INFO_FILE, SAMPLES_FOLDER, open_samples, set_aside
from rcat_ray.errors import DamagedArtifactError, DamagedSetError, DataError, StoreError, UncheckedArtifactError
from rcat_ray.evaluate.comparison import COMPARISON_MEMBERS, load_comparison
from rcat_ray.evaluate.plan import TABLE_MEMBERS, chunk_file_names
from rcat_ray.store.result_store import ResultStore, table_from_bytes

Kind = Literal["table", "comparison"]

_KIND_FOLDERS: dict[str, str] = {"table": "tables", "comparison": "comparisons"}
_CHUNK_MANIFEST = re.compile(r"^chunk-(\d{6})\.json$")


def _open(store: ResultStore | str | Path) -> ResultStore:
    return store if isinstance(store, ResultStore) else ResultStore(store)


# -- verify ----------------------------------------------------------------------------------------------


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
    store = _open(store)
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
    chunk_ids = sorted(int(m.group(1)) for m in map(_CHUNK_MANIFEST.match, names) if m)
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


# -- inventory -------------------------------------------------------------------------------------------


def list_entries(store: ResultStore | str | Path) -> list[dict[str, Any]]:
    """Every table and comparison of the store, oldest first, from their manifests (nothing is hashed).

    Each entry: ``kind``, ``key``, ``complete``, ``models`` (``[name]`` or ``[old, new]``), ``data``
    (``{"name", "split"}``), ``attack`` (``{"norm", "eps", "attacks"}``), ``n`` (samples), ``n_robust``
    (samples attacked), ``created_at``, and for a comparison ``tables`` (its old and new table keys). A table
    still being evaluated is listed with ``complete: False`` and ``chunks_done``; an entry whose manifest
    cannot be read is listed with ``problem`` (``verify_store`` says more).
    """
    store = _open(store)
    entries = []
    for kind, top in _KIND_FOLDERS.items():
        for key in store.list_dirs(top):
            folder = f"{top}/{key}"
            manifest = _plain_manifest(store, folder)
            if manifest is not None:
                entries.append(_entry(kind, key, manifest))  # type: ignore[arg-type]
            elif store.exists(f"{folder}/manifest.json"):
                entries.append({"kind": kind, "key": key, "complete": False, "problem": "unreadable manifest"})
            elif kind == "table":
                entries.append(_unfinished_table(store, key))
    return sorted(entries, key=lambda e: (e.get("created_at") or "~", e["kind"], e["key"]))


def _plain_manifest(store: ResultStore, folder: str) -> dict[str, Any] | None:
    try:
        manifest = store.read_json(f"{folder}/manifest.json")
    except (StoreError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _entry(kind: Kind, key: str, manifest: dict[str, Any]) -> dict[str, Any]:
    data = manifest.get("data") or {}
    attack = manifest.get("attack") or {}
    n = data.get("n_samples")
    robust = attack.get("robust_samples")
    entry: dict[str, Any] = {"kind": kind, "key": key, "complete": True}
    if kind == "table":
        entry["models"] = [(manifest.get("model") or {}).get("name", "?")]
    else:
        entry["models"] = [(manifest.get(f"{s}_model") or {}).get("name", "?") for s in ("old", "new")]
    entry |= {
        "data": {"name": data.get("dataset"), "split": data.get("split")},
        "attack": {
            "norm": attack.get("norm"),
            "eps": attack.get("eps"),
            "attacks": list(attack.get("attacks") or manifest.get("attacks") or []),
        },
        "n": n,
        "n_robust": min(n, robust) if isinstance(n, int) and isinstance(robust, int) else n,
        "created_at": manifest.get("created_at"),
    }
    if kind == "comparison":
        entry["tables"] = [manifest.get("old_table"), manifest.get("new_table")]
    return entry


def _unfinished_table(store: ResultStore, key: str) -> dict[str, Any]:
    """An evaluation in progress: which model (from a chunk manifest) and how many chunks are done."""
    chunks = f"tables/{key}/chunks"
    done = [n for n in store.list_files(chunks) if _CHUNK_MANIFEST.match(n)]
    models: list[str] = []
    if done:
        try:
            first = store.read_json(f"{chunks}/{done[0]}")
            models = [first["model"]] if isinstance(first, dict) and first.get("model") else []
        except (StoreError, ValueError):
            pass
    return {"kind": "table", "key": key, "complete": False, "models": models, "chunks_done": len(done)}


def resolve_key(store: ResultStore | str | Path, prefix: str, kind: Kind | None = None) -> str:
    """The full key of the one table or comparison whose key starts with ``prefix``.

    Accepts a full key, any unique prefix, or an artifact's folder (``results/comparisons/3f1c...``), so every
    command that takes a key takes what the user copied. Only finished entries count (a table still being
    evaluated has nothing to show). Raises StoreError naming the candidates when the prefix is ambiguous, and
    "no table or comparison starts with ..." when nothing matches.
    """
    return _resolve(_open(store), prefix, kind)[1]


def _resolve(store: ResultStore, prefix: str, kind: Kind | None) -> tuple[Kind, str]:
    if kind is not None and kind not in _KIND_FOLDERS:
        raise ValueError(f"kind must be 'table' or 'comparison', not {kind!r}")
    text = str(prefix).strip().rstrip("/").rsplit("/", 1)[-1]
    what = kind or "table or comparison"
    if not text:
        raise StoreError(f"an empty key does not name a {what}")
    matches: list[tuple[Kind, str]] = []
    unfinished: list[tuple[Kind, str]] = []
    for k in [kind] if kind else list(_KIND_FOLDERS):
        top = _KIND_FOLDERS[k]
        for key in store.list_dirs(top):
            if key.startswith(text):
                done = store.exists(f"{top}/{key}/manifest.json")
                (matches if done else unfinished).append((k, key))  # type: ignore[arg-type]
    exact = [m for m in matches if m[1] == text]
    if len(exact) == 1:
        return exact[0]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        note = ""
        if unfinished:
            shown = ", ".join(f"{k} {key}" for k, key in unfinished[:5])
            note = f" ({shown}: not finished; run the evaluation again)"
        raise StoreError(f"no {what} starts with '{text}' in store {store.uri}{note}")
    shown = "; ".join(_candidate(store, k, key) for k, key in matches[:10])
    more = f"; and {len(matches) - 10} more" if len(matches) > 10 else ""
    raise StoreError(
        f"'{text}' is ambiguous in store {store.uri}: {len(matches)} entries start with it: {shown}{more}. "
        "Give more characters of the key."
    )


def _candidate(store: ResultStore, kind: Kind, key: str) -> str:
    manifest = _plain_manifest(store, f"{_KIND_FOLDERS[kind]}/{key}")
    if manifest is None:
        return f"{kind} {key}"
    return f"{kind} {key} ({' -> '.join(_entry(kind, key, manifest)['models'])})"


def describe_entry(store: ResultStore | str | Path, key: str) -> dict[str, Any]:
    """The headline numbers of a table or comparison (``key`` may be any unique prefix), as plain data.

    A table: ``metrics.clean_acc`` and ``metrics.robust_acc``, each ``{"value", "n"}`` (robust accuracy over
    the attacked samples), and ``broken_by`` (samples each attack broke). A comparison: every metric of the
    summary with ``value``, ``ci_low``, ``ci_high`` and ``n``, in display order, with ``n_clean``/``n_robust``.
    Both carry the full ``key``, the model(s), data, attack, created-at, and ``verified`` (False only for
    entries written before checksums). Files are read through their checksums; a damaged one is moved aside
    and reported as a StoreError that says how to recompute it.
    """
    store = _open(store)
    kind, full = _resolve(store, key, None)
    return _describe_table(store, full) if kind == "table" else _describe_comparison(store, full)


def _describe_table(store: ResultStore, key: str) -> dict[str, Any]:
    folder = f"tables/{key}"
    verified = True
    try:
        manifest = store.read_manifest(f"{folder}/manifest.json")
        if manifest is None:
            raise StoreError(f"no table {key} in store {store.uri}")
        table = table_from_bytes(store.read_verified(folder, TABLE_MEMBERS[0], manifest))
    except UncheckedArtifactError:
        verified, manifest = False, store.read_json(f"{folder}/manifest.json")
        table = store.read_table(f"{folder}/{TABLE_MEMBERS[0]}")
    except DamagedArtifactError as err:
        store.quarantine_artifact(folder, "manifest.json", TABLE_MEMBERS, [(err.path, err.problem)])
        raise StoreError(f"{err}; moved aside: evaluate the model again to rebuild the table") from None
    clean = np.asarray(table.column("clean_correct").to_numpy(zero_copy_only=False), dtype=bool)
    robust = np.asarray(table.column("robust").drop_null().to_numpy(zero_copy_only=False), dtype=bool)
    broken = Counter(table.column("broken_by").drop_null().to_pylist())
    entry = _entry("table", key, manifest)
    return {
        **entry,
        "verified": verified,
        "model": manifest.get("model"),
        "metrics": {
            "clean_acc": {"value": float(clean.mean()) if clean.size else None, "n": int(clean.size)},
            "robust_acc": {"value": float(robust.mean()) if robust.size else None, "n": int(robust.size)},
        },
        "broken_by": dict(sorted(broken.items())),
    }


def _describe_comparison(store: ResultStore, key: str) -> dict[str, Any]:
    comparison = load_comparison(store, key)
    manifest = _plain_manifest(store, f"comparisons/{key}") or {}
    summary = comparison.summary
    metrics = summary.get("metrics", {})
    return {
        **_entry("comparison", key, manifest),
        "verified": "files" in manifest,
        "old": {"table": manifest.get("old_table"), **(summary.get("old") or {})},
        "new": {"table": manifest.get("new_table"), **(summary.get("new") or {})},
        "n_clean": summary.get("n_clean"),
        "n_robust": summary.get("n_robust"),
        "bootstrap": summary.get("bootstrap"),
        "metrics": {name: metrics[name] for name in METRICS if name in metrics},
    }
