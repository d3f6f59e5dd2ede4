"""An evaluation with several attack seeds: one ordinary per-model table per seed, and their ensemble.

In the ensemble a sample is robust only when the attack failed under every seed (a stronger attack than any one
seed), and the share of attacked samples on which the seeds disagree is the attack's noise: how much of a robust
flag, and so of a flip, another random start would change. Each seed's table is the table a single-seed run with
that seed writes, so it is shared with such runs. The ensemble is a per-model table like any other (its own key,
manifest and checksum), so comparisons, reports and gates read it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rcat_ray.config import AttackConfig, EvaluationSettings, stable_hash
from rcat_ray.core.attack_checks import merge_records
from rcat_ray.core.attacks import PER_MODEL_SCHEMA
from rcat_ray.errors import StoreError
from rcat_ray.evaluate.chunks import TABLE_MEMBERS
from rcat_ray.evaluate.comparison import read_table_verified
from rcat_ray.evaluate.plan import EvaluationPlan, TableAddress
from rcat_ray.store.result_store import ResultStore, parquet_bytes

ENSEMBLE_VERSION = 1
#: the columns taken from the seed that decided a sample (the first that broke it, else the first seed)
_DECIDING = ("adv_pred", "adv_margin", "perturbation_linf", "broken_by")


@dataclass
class EnsemblePlan(TableAddress):
    """The seeds' plans of one model and where their ensemble table lives."""

    seed_plans: list[EvaluationPlan]
    attack: AttackConfig  # with ``seeds``
    key: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.identity = {
            "ensemble_version": ENSEMBLE_VERSION,
            "seeds": list(self.attack.seeds or ()),
            "tables": [p.key for p in self.seed_plans],
        }
        self.key = stable_hash(self.identity, length=24)

    @property
    def model(self) -> Any:
        return self.seed_plans[0].model

    @property
    def samples(self) -> Any:
        return self.seed_plans[0].samples


def combine(tables: list[pa.Table]) -> tuple[pa.Table, dict[str, Any]]:
    """The ensemble of the seeds' tables (same samples, sorted by id) and the attack noise they show."""
    ids = tables[0].column("sample_id").to_numpy()
    for t in tables[1:]:
        if not np.array_equal(t.column("sample_id").to_numpy(), ids):
            raise StoreError("the seeds' tables do not hold the same samples")
    attacked = tables[0].column("robust").is_valid().to_numpy(zero_copy_only=False)
    robust = np.stack([t.column("robust").fill_null(False).to_numpy(zero_copy_only=False) for t in tables])
    correct = np.stack([t.column("clean_correct").to_numpy(zero_copy_only=False) for t in tables])
    broken = attacked & correct & ~robust  # per seed
    deciding = np.where(broken.any(axis=0), broken.argmax(axis=0), 0)  # first seed that broke it, else seed 0
    rows = np.arange(len(ids))
    columns = {name: tables[0].column(name) for name in PER_MODEL_SCHEMA.names}
    for name in _DECIDING:
        stacked = [t.column(name).combine_chunks() for t in tables]
        columns[name] = pa.chunked_array([pa.concat_arrays(stacked).take(pa.array(deciding * len(ids) + rows))])
    columns["robust"] = pa.array(robust.all(axis=0), pa.bool_(), mask=~attacked)
    lows = np.stack([t.column("min_margin").to_numpy(zero_copy_only=False).astype(np.float64) for t in tables])
    columns["min_margin"] = pa.array(np.nanmin(np.where(attacked, lows, 0.0), axis=0), pa.float32(), mask=~attacked)
    table = pa.table(columns, schema=PER_MODEL_SCHEMA)
    disagree = attacked & (robust.any(axis=0) != robust.all(axis=0))
    n = int(attacked.sum())
    noise = {
        "n": n,
        "disagree": int(disagree.sum()),
        "rate": float(disagree.sum() / n) if n else None,
        "rob_acc_per_seed": [float(r[attacked].mean()) if n else None for r in robust],
        "rob_acc": float(robust.all(axis=0)[attacked].mean()) if n else None,
    }
    return table, noise


def assemble_ensemble(plan: EnsemblePlan, store: ResultStore, settings: EvaluationSettings) -> None:
    """Write the ensemble table and its manifest from the seeds' (complete) tables; a no-op once done."""
    if plan.table_done(store):
        return
    manifests, tables = zip(*(read_table_verified(store, p.key) for p in plan.seed_plans), strict=True)
    table, noise = combine(list(tables))
    identity = {"kind": "per-model-table", "key": plan.key, **plan.identity}
    record = store.write_member(plan.table_path, parquet_bytes(table, identity))
    manifest = {
        **plan.seed_plans[0].manifest(settings),
        "key": plan.key,
        "attack": plan.attack.model_dump(mode="json"),
        "seed": None,
        "ensemble": {**plan.identity, "attack_noise": noise},
        "sanity": merge_records([m.get("sanity") for m in manifests]),
        "files": {TABLE_MEMBERS[0]: record},
    }
    store.put_json(plan.manifest_path, manifest)
