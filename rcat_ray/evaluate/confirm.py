"""Confirming a comparison's robustness flips with a stronger attack, stored beside the comparison.

The old model is re-attacked on its robustness negative flips, the new one on its positive flips (the side that
withstood; :mod:`rcat_ray.core.flips.confirmed`). Each side's rows are stored once under
``comparisons/<comparison>/confirm-<key>/`` (the key: the comparison and the stronger attack), with a manifest
of their checksum, so an interrupted confirmation redoes only the side it had not finished and a repeated one
recomputes nothing. :func:`attack_side` is what a worker runs: it reads only the flips' rows from the sample set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from rcat_ray.config import STANDARD_CASCADE, AttackConfig, stable_hash
from rcat_ray.core.attacks import chunk_seed, evaluate_chunk
from rcat_ray.core.models import ModelRef, load_reference
from rcat_ray.core.samples import open_samples
from rcat_ray.errors import ConfigError, DamagedArtifactError
from rcat_ray.evaluate.chunks import sample_ids
from rcat_ray.evaluate.worker import resolve_device
from rcat_ray.store.result_store import ResultStore, parquet_bytes, table_from_bytes

CONFIRM_VERSION = 1
SIDES = ("old", "new")


def stronger_attack(attack: AttackConfig, override: AttackConfig | None) -> AttackConfig:
    """The confirming attack: ``override``, or AutoAttack's standard cascade with 5 APGD-CE restarts and 100
    iterations, under the comparison's own threat model (another norm or eps would answer another question)."""
    if override is not None:
        if (override.norm, override.eps) != (attack.norm, attack.eps):
            raise ConfigError(
                f"confirm_attack must keep the comparison's threat model ({attack.norm}, eps {attack.eps:g}), "
                f"not {override.norm}, eps {override.eps:g}"
            )
        return override.single_seed(override.seed)
    return AttackConfig(
        norm=attack.norm,
        eps=attack.eps,
        attacks=STANDARD_CASCADE,
        n_iter=100,
        n_restarts=5,
        n_target_classes=9,
        square_queries=5000,
        seed=attack.seed,
    )


@dataclass(frozen=True)
class ConfirmPlan:
    """Where a comparison's confirmation under one attack lives."""

    comparison: str
    attack: AttackConfig

    @property
    def key(self) -> str:
        identity = {"version": CONFIRM_VERSION, "comparison": self.comparison, "attack": self.attack.model_dump()}
        return stable_hash(identity, length=16)

    @property
    def folder(self) -> str:
        return f"comparisons/{self.comparison}/confirm-{self.key}"

    def side_path(self, side: str) -> str:
        return f"{self.folder}/{side}.parquet"

    def side_manifest(self, side: str) -> str:
        return f"{self.folder}/{side}.json"


def stored_side(store: ResultStore, plan: ConfirmPlan, side: str) -> pa.Table | None:
    """A side's stored rows, read through their checksum; None when not done (or damaged: then moved aside)."""
    manifest = None
    try:
        manifest = store.read_manifest(plan.side_manifest(side))
        if manifest is None:
            return None
        return table_from_bytes(store.read_verified(plan.folder, f"{side}.parquet", manifest))
    except DamagedArtifactError as err:
        store.quarantine_artifact(
            plan.folder, f"{side}.json", (f"{side}.parquet",), [(err.path, err.problem)], manifest
        )
        return None


def store_side(store: ResultStore, plan: ConfirmPlan, side: str, table: pa.Table, ids: list[int]) -> None:
    """Write a side's rows, then its manifest (the "done" marker)."""
    record = store.write_member(plan.side_path(side), parquet_bytes(table))
    store.put_json(
        plan.side_manifest(side),
        {
            "kind": "confirmation",
            "side": side,
            "attack": plan.attack.model_dump(mode="json"),
            "n": len(ids),
            "files": {f"{side}.parquet": record},
        },
    )


def attack_side(
    model: ModelRef, samples_location: str, ids: list[int], attack: AttackConfig, chunk_size: int, device: str
) -> pa.Table:
    """Re-attack one model on some samples (a worker's job): their rows only are read from the sample set, in
    chunks of ``chunk_size`` with seeds fixed by the chunk's index, so the rows never depend on the worker."""
    samples = open_samples(samples_location)
    wanted = np.asarray(sorted(ids), dtype=np.int64)
    all_ids = sample_ids(samples)
    positions = np.searchsorted(all_ids, wanted)
    if len(wanted) and (positions.max() >= len(all_ids) or not np.array_equal(all_ids[positions], wanted)):
        raise ValueError("a flip's sample is not in the evaluated sample set")
    module = load_reference(model).module
    dev = resolve_device(device)
    parts = []
    for i, lo in enumerate(range(0, len(wanted), chunk_size)):
        pos = positions[lo : lo + chunk_size]
        images, labels, got = next(samples.iter_batches(len(pos), positions=pos))
        result = evaluate_chunk(
            module,
            images,
            labels,
            got,
            attack,
            num_classes=model.num_classes,
            seed=chunk_seed(attack.seed, i),
            device=dev,
        )
        parts.append(result.table)
    if not parts:
        return pa.table({"sample_id": pa.array([], pa.int64()), "robust": pa.array([], pa.bool_())})
    return pa.concat_tables(parts).sort_by("sample_id")


def holds(table: pa.Table) -> dict[int, bool]:
    """sample id -> whether the model withstood the stronger attack."""
    ids = table.column("sample_id").to_pylist()
    robust = table.column("robust").fill_null(False).to_pylist()
    return dict(zip(ids, (bool(r) for r in robust), strict=True))


def describe_confirmed(record: dict[str, Any]) -> str:
    """One line per confirmed rate, as compare prints it."""
    lines = []
    for key, label in (("r_nfr", "R-NFR"), ("r_pfr", "R-PFR")):
        entry = record[f"{key}_confirmed"]
        value = "n/a" if entry["value"] is None else f"{100 * entry['value']:.2f}%"
        ci = "" if entry.get("ci_low") is None else f" [{100 * entry['ci_low']:.2f}, {100 * entry['ci_high']:.2f}]"
        lines.append(
            f"{label} confirmed {value}{ci} (N={entry['n']}): {record[f'{key}_flips'] - record[f'{key}_dissolved']} of "
            f"{record[f'{key}_flips']} flips hold, {record[f'{key}_dissolved']} dissolved under the stronger attack"
        )
    return "\n".join(lines)
