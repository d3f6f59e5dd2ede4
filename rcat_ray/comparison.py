"""A comparison of two stored per-model tables: the flip table and the summary, stored once.

Comparing is a join on ``sample_id`` and a bootstrap, so it is cheap; it is still stored (content-addressed
by the two table keys and the bootstrap settings) so reports and nightly history can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rcat_ray.config import BootstrapConfig, stable_hash
from rcat_ray.core.flips import flip_table, summarize
from rcat_ray.store import ResultStore, now_iso, package_versions


class ComparisonError(ValueError):
    """Two tables that cannot be compared (different samples or attack)."""


@dataclass
class Comparison:
    """Old -> new flips with their summary, and where they are stored."""

    key: str
    folder: str
    old: dict[str, Any]  # the old table's manifest
    new: dict[str, Any]
    flips: pa.Table
    summary: dict[str, Any]


def compare_stored(
    store: ResultStore,
    old_key: str,
    new_key: str,
    bootstrap: BootstrapConfig,
    class_names: list[str] | None = None,
) -> Comparison:
    """Join two per-model tables of the store into flips and a summary (reused if already stored)."""
    key = stable_hash({"old": old_key, "new": new_key, "bootstrap": bootstrap.model_dump()}, length=24)
    folder = f"comparisons/{key}"
    old_manifest = store.read_json(f"tables/{old_key}/manifest.json")
    new_manifest = store.read_json(f"tables/{new_key}/manifest.json")
    for part in ("data", "attack"):
        if old_manifest[part] != new_manifest[part]:
            raise ComparisonError(
                f"tables {old_key} and {new_key} were evaluated with different {part} settings; "
                "flips are only defined on the same samples under the same attack"
            )
    if store.exists(f"{folder}/summary.json"):
        return Comparison(
            key, folder, old_manifest, new_manifest,
            store.read_table(f"{folder}/flips.parquet"), store.read_json(f"{folder}/summary.json"),
        )  # fmt: skip
    flips = flip_table(
        store.read_table(f"tables/{old_key}/table.parquet"), store.read_table(f"tables/{new_key}/table.parquet")
    )
    summary = summarize(
        flips,
        n_bootstrap=bootstrap.n_resamples,
        confidence=bootstrap.confidence,
        seed=bootstrap.seed,
        num_classes=old_manifest["model"]["num_classes"],
        class_names=class_names,
    )
    summary["old"] = {"name": old_manifest["model"]["name"], "fingerprint": old_manifest["model"]["fingerprint"]}
    summary["new"] = {"name": new_manifest["model"]["name"], "fingerprint": new_manifest["model"]["fingerprint"]}
    summary["threat_model"] = old_manifest["threat_model"]
    summary["attacks"] = old_manifest["attacks"]
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
        "versions": package_versions(),
        "created_at": now_iso(),
    }
    store.put_table(f"{folder}/flips.parquet", flips)
    store.put_json(f"{folder}/summary.json", summary)
    store.put_json(f"{folder}/manifest.json", manifest)
    return Comparison(key, folder, old_manifest, new_manifest, flips, summary)
