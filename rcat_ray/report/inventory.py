"""What a result store holds: plain functions for ``rcat-ray store ls/show`` and for scripts.

``list_entries`` lists tables and comparisons from their manifests (no hashing); ``resolve_key`` turns any
unique key prefix (or an artifact's folder) into a key; ``describe_entry`` gives a table's clean and robust
accuracy, or a comparison's metrics with their confidence intervals, read through the checksums. Checking and
repairing the store is :func:`rcat_ray.report.verify.verify_store` (importable from here too). They return plain
JSON-able data, never print, and raise ``StoreError`` with a message meant for the user.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rcat_ray.core.flips import METRICS
from rcat_ray.errors import DamagedArtifactError, StoreError, UncheckedArtifactError
from rcat_ray.evaluate.chunks import CHUNK_MANIFEST, TABLE_MEMBERS
from rcat_ray.evaluate.comparison import load_comparison
from rcat_ray.report.verify import as_store, verify_store
from rcat_ray.store.result_store import ResultStore, table_from_bytes

__all__ = ["Kind", "describe_entry", "list_entries", "resolve_key", "verify_store"]

Kind = Literal["table", "comparison"]

_KIND_FOLDERS: dict[str, str] = {"table": "tables", "comparison": "comparisons"}


def list_entries(store: ResultStore | str | Path) -> list[dict[str, Any]]:
    """Every table and comparison of the store, oldest first, from their manifests (nothing is hashed).

    Each entry: ``kind``, ``key``, ``complete``, ``models`` (``[name]`` or ``[old, new]``), ``data``
    (``{"name", "split"}``), ``attack`` (``{"norm", "eps", "attacks"}``), ``n`` (samples), ``n_robust``
    (samples attacked), ``created_at``, and for a comparison ``tables`` (its old and new table keys). A table
    still being evaluated is listed with ``complete: False`` and ``chunks_done``; an entry whose manifest
    cannot be read is listed with ``problem`` (``verify_store`` says more).
    """
    store = as_store(store)
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
    done = [n for n in store.list_files(chunks) if CHUNK_MANIFEST.match(n)]
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
    return _resolve(as_store(store), prefix, kind)[1]


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
    store = as_store(store)
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
