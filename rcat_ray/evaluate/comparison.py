"""A comparison of two stored per-model tables: the flip table and the summary, stored once.

Comparing is a join on ``sample_id`` and a bootstrap, so it is cheap; it is still stored (content-addressed
by the two table keys and the bootstrap settings) so reports and nightly history can point at it.

Integrity: ``manifest.json`` is written last and records the sha256 and size of ``flips.parquet`` and
``summary.json``. A stored comparison is reused only when both match; a damaged one is moved to the store's
quarantine folder (with a warning) and recomputed from the two tables, which are themselves read through
the checksums their manifests record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rcat_ray.config import BootstrapConfig, stable_hash
from rcat_ray.core.flips import NEAR_MARGIN, flip_table, summarize
from rcat_ray.errors import ComparisonError, DamagedArtifactError, StoreError, UncheckedArtifactError
from rcat_ray.store.result_store import (
    ResultStore,
    json_bytes,
    now_iso,
    package_versions,
    parquet_bytes,
    table_from_bytes,
)

#: The files of a stored comparison besides its manifest.
COMPARISON_MEMBERS = ("flips.parquet", "summary.json")
_TABLE_FILE = "table.parquet"  # the per-model table of tables/<key>/ (rcat_ray.evaluate.plan.TABLE_MEMBERS)


@dataclass
class Comparison:
    """Old -> new flips with their summary, and where they are stored."""

    key: str
    folder: str
    old: dict[str, Any]  # the old table's manifest
    new: dict[str, Any]
    flips: pa.Table
    summary: dict[str, Any]
    #: the comparison's own manifest, as read (or written) with its files: what it compared and when
    manifest: dict[str, Any] = field(default_factory=dict)
    #: the flips re-checked by a stronger attack, when asked for (``compare --confirm``; evaluate.confirm)
    confirmed: dict[str, Any] | None = None


def comparison_key(old_key: str, new_key: str, bootstrap: BootstrapConfig, near_margin: float = NEAR_MARGIN) -> str:
    """The store key of a comparison: its two tables, the bootstrap settings and the near-flip margin decide it."""
    identity = {"old": old_key, "new": new_key, "bootstrap": bootstrap.model_dump(), "near_margin": near_margin}
    return stable_hash(identity, length=24)


def compare_stored(
    store: ResultStore,
    old_key: str,
    new_key: str,
    bootstrap: BootstrapConfig,
    class_names: list[str] | None = None,
    near_margin: float = NEAR_MARGIN,
) -> Comparison:
    """Join two per-model tables of the store into flips and a summary (reused if stored and intact)."""
    key = comparison_key(old_key, new_key, bootstrap, near_margin)
    folder = f"comparisons/{key}"
    old_manifest = table_manifest(store, old_key)
    new_manifest = table_manifest(store, new_key)
    for part in ("data", "attack"):
        if old_manifest[part] != new_manifest[part]:
            raise ComparisonError(
                f"tables {old_key} and {new_key} were evaluated with different {part} settings; "
                "flips are only defined on the same samples under the same attack"
            )
    stored = _read_stored(store, folder)
    if stored is not None:
        stored_manifest, flips, summary = stored
        return Comparison(key, folder, old_manifest, new_manifest, flips, summary, stored_manifest)
    flips = flip_table(_read_table(store, old_key, old_manifest), _read_table(store, new_key, new_manifest))
    summary = summarize(
        flips,
        n_bootstrap=bootstrap.n_resamples,
        confidence=bootstrap.confidence,
        seed=bootstrap.seed,
        num_classes=old_manifest["model"]["num_classes"],
        class_names=class_names,
        near_margin=near_margin,
    )
    summary["old"] = {"name": old_manifest["model"]["name"], "fingerprint": old_manifest["model"]["fingerprint"]}
    summary["new"] = {"name": new_manifest["model"]["name"], "fingerprint": new_manifest["model"]["fingerprint"]}
    summary["threat_model"] = old_manifest["threat_model"]
    summary["attacks"] = old_manifest["attacks"]
    noise = _attack_noise(store, old_manifest, new_manifest)
    if noise is not None:
        summary["attack_noise"] = noise
    manifest = {
        "kind": "comparison",
        "key": key,
        "old_table": old_key,
        "new_table": new_key,
        "old_model": old_manifest["model"],
        "new_model": new_manifest["model"],
        "data": old_manifest["data"],
        "attack": old_manifest["attack"],
        "bootstrap": bootstrap.model_dump(),
        "near_margin": near_margin,
        "versions": package_versions(),
        "created_at": now_iso(),
    }
    files = {
        "flips.parquet": store.write_member(f"{folder}/flips.parquet", parquet_bytes(flips)),
        "summary.json": store.write_member(f"{folder}/summary.json", json_bytes(summary)),
    }
    manifest = {**manifest, "files": files}
    store.put_json(f"{folder}/manifest.json", manifest)  # last: the "done" marker
    return Comparison(key, folder, old_manifest, new_manifest, flips, summary, manifest)


def load_comparison(store: ResultStore, key: str, *, with_tables: bool = True) -> Comparison:
    """A stored comparison read through its checksums (for reports and ``describe``).

    Raises StoreError when it is not stored, or when it is damaged (naming the file): it is then moved aside,
    and comparing the two models again recomputes it from their tables. A comparison written before checksums
    existed is read as it is (there is nothing to check it against). ``with_tables``: also read the two
    tables' manifests into ``old`` and ``new`` (one that is gone or damaged is replaced by what the
    comparison records of its model); without, ``old`` and ``new`` only hold that record, for callers that read
    the tables themselves and must stop on damage (reports).
    """
    folder = f"comparisons/{key}"
    if not store.exists(f"{folder}/manifest.json"):
        raise StoreError(f"no comparison {key} in store {store.uri}")
    try:
        store.read_manifest(f"{folder}/manifest.json")
    except UncheckedArtifactError:  # written before checksums: readable, not verifiable, never reused by compare
        legacy = store.read_json(f"{folder}/manifest.json")
        flips, summary = store.read_table(f"{folder}/flips.parquet"), store.read_json(f"{folder}/summary.json")
        old = {"key": legacy.get("old_table"), "model": legacy.get("old_model")}
        new = {"key": legacy.get("new_table"), "model": legacy.get("new_model")}
        return Comparison(key, folder, old, new, flips, summary, legacy)
    except DamagedArtifactError:
        pass  # _read_checked names it and moves it aside
    try:
        stored = _read_checked(store, folder)
    except DamagedArtifactError as err:
        raise StoreError(f"{err}; comparison {key} moved aside: compare the two models again to recompute it") from None
    if stored is None:  # its manifest went between the two reads (moved aside by a concurrent reader)
        raise StoreError(f"no comparison {key} in store {store.uri}")
    manifest, flips, summary = stored
    sides = []
    for side in ("old", "new"):
        recorded = {"key": manifest[f"{side}_table"], "model": manifest[f"{side}_model"]}
        if not with_tables:
            sides.append(recorded)
            continue
        try:
            sides.append(table_manifest(store, manifest[f"{side}_table"]))
        except StoreError:  # the table is gone or damaged: the comparison still names its model
            sides.append(recorded)
    return Comparison(key, folder, sides[0], sides[1], flips, summary, manifest)


def table_manifest(store: ResultStore, table_key: str) -> dict[str, Any]:
    """The manifest of a stored per-model table; StoreError (naming the key) when it is absent or unusable.

    An unreadable manifest is moved aside with its table, so the next evaluation rebuilds the table from its
    chunks; one without checksums (an older rcat_ray) is left alone and refused.
    """
    folder = f"tables/{table_key}"
    try:
        manifest = store.read_manifest(f"{folder}/manifest.json")
    except UncheckedArtifactError as err:
        raise StoreError(
            f"{err}: table {table_key} was written by an older rcat_ray and cannot be verified; "
            "evaluate the model again (the current version stores it under a new key)"
        ) from None
    except DamagedArtifactError as err:
        store.quarantine_artifact(folder, "manifest.json", (_TABLE_FILE,), [(err.path, err.problem)])
        raise StoreError(f"{err}; moved aside: evaluate the model again to rebuild the table") from None
    if manifest is None:
        raise StoreError(f"no table {table_key} in store {store.uri} (or its evaluation is not finished)")
    return manifest


_FLAG_COLUMNS = ("new_robust", "neg_flip", "robust_neg_flip", "robust_pos_flip")
#: flip flags whose stability across attack seeds a comparison of two seed ensembles reports
_NOISY_FLAGS = {
    "rob_acc": lambda f: f["new_robust"],
    "r_nfr": lambda f: f["robust_neg_flip"],
    "r_pfr": lambda f: f["robust_pos_flip"],
    "s_nfr": lambda f: f["neg_flip"] | f["robust_neg_flip"],
}


def _attack_noise(store: ResultStore, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """For two ensembles over the same seeds: each robust metric under each seed alone (both models attacked with
    that seed), and on how many samples its flag changes from one seed to another."""
    old_e, new_e = old.get("ensemble"), new.get("ensemble")
    if not old_e or not new_e or old_e["seeds"] != new_e["seeds"]:
        return None
    per_seed = []
    for a, b in zip(old_e["tables"], new_e["tables"], strict=True):
        f = flip_table(read_table_verified(store, a)[1], read_table_verified(store, b)[1])
        both = f.column("robust_neg_flip").is_valid().to_numpy(zero_copy_only=False)
        cols = {c: f.column(c).fill_null(False).to_numpy(zero_copy_only=False) for c in _FLAG_COLUMNS}
        per_seed.append((both, cols))
    both = per_seed[0][0]
    n = int(both.sum())
    metrics = {}
    for key, flag in _NOISY_FLAGS.items():
        flags = np.stack([flag(cols)[both] for _, cols in per_seed])
        unstable = int((flags.any(axis=0) != flags.all(axis=0)).sum())
        metrics[key] = {
            "per_seed": [float(x.mean()) if n else None for x in flags],
            "unstable": unstable,
            "unstable_rate": unstable / n if n else None,
            "n": n,
        }
    return {"seeds": old_e["seeds"], "metrics": metrics}


def read_table_verified(store: ResultStore, table_key: str) -> tuple[dict[str, Any], pa.Table]:
    """(manifest, table) of a stored per-model table, read through its checksum (StoreError when unusable)."""
    manifest = table_manifest(store, table_key)
    return manifest, _read_table(store, table_key, manifest)


def _read_table(store: ResultStore, table_key: str, manifest: dict[str, Any]) -> pa.Table:
    """A per-model table read through its checksum; a damaged one is moved aside and reported as an error."""
    folder = f"tables/{table_key}"
    try:
        return table_from_bytes(store.read_verified(folder, _TABLE_FILE, manifest))
    except DamagedArtifactError as err:
        store.quarantine_artifact(folder, "manifest.json", (_TABLE_FILE,), [(err.path, err.problem)], manifest)
        raise StoreError(
            f"{err}; moved aside: evaluate the model again and the table is rebuilt from its chunks"
        ) from None


def _read_stored(store: ResultStore, folder: str) -> tuple[dict[str, Any], pa.Table, dict[str, Any]] | None:
    """(manifest, flips, summary) of a done comparison, each file checked against the manifest's sha256.

    None when the comparison is not done, or when it was damaged: then it has been moved aside, with a
    warning, so the caller recomputes it instead of reusing it because it exists.
    """
    try:
        return _read_checked(store, folder)
    except DamagedArtifactError:
        return None


def _read_checked(store: ResultStore, folder: str) -> tuple[dict[str, Any], pa.Table, dict[str, Any]] | None:
    """Like :func:`_read_stored`, but a damaged comparison, once moved aside, is raised (naming the file that
    failed) for callers that cannot recompute it (reports, ``describe``)."""
    manifest = None
    try:
        manifest = store.read_manifest(f"{folder}/manifest.json")
        if manifest is None:
            return None
        flips = table_from_bytes(store.read_verified(folder, "flips.parquet", manifest))
        summary = json.loads(store.read_verified(folder, "summary.json", manifest))
    except DamagedArtifactError as err:
        store.quarantine_artifact(folder, "manifest.json", COMPARISON_MEMBERS, [(err.path, err.problem)], manifest)
        raise
    return manifest, flips, summary
