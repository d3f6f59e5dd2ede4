"""The study's numbers from its per-(pair, seed) paper tables: values over seeds, RCAT's differences, counts.

Ray-free. For each pair: every row's metric per seed with its mean and range; RCAT minus each other row,
averaged over seeds, with a paired bootstrap over the shared test samples (:mod:`rcat_ray.core.flips.seeds`)
and the number of seeds whose own paired CI excludes 0; then, over pairs, how often RCAT is lower, higher or
not distinguishable from each row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rcat_ray.config import BootstrapConfig
from rcat_ray.core.flips.seeds import seed_mean_difference
from rcat_ray.evaluate.paper_table import COLUMNS, PairTable

#: The row RCAT is compared with, in the order tables show them.
COMPARED = ("new", "at", "pcat", "pct")
_FLIP_METRICS = {"nfr", "r_nfr", "s_nfr"}


@dataclass
class PairResult:
    """One pair over its seeds. ``roles``: role (old, new, or a method kind) -> the row's label."""

    name: str
    roles: dict[str, str]
    seeds: list[int]
    values: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # role -> column -> stats
    differences: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # role -> column -> diff
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> weights and choice metrics
    validation: dict[str, Any] = field(default_factory=dict)  # the validation that chose, and the new model's bar
    sweep: str = ""  # the pair's Tune experiment


def _cell(summary: dict[str, Any], metric: str, error: bool) -> tuple[float | None, float | None, float | None]:
    """(value, ci_low, ci_high) of one metric; an error is 1 - the accuracy, its interval flipped."""
    m = summary["metrics"][metric]
    v, lo, hi = m["value"], m["ci_low"], m["ci_high"]
    if not error or v is None:
        return v, lo, hi
    return 1 - v, None if hi is None else 1 - hi, None if lo is None else 1 - lo


def _excludes_zero(d: dict[str, Any]) -> bool:
    return d.get("ci_low") is not None and (d["ci_low"] > 0 or d["ci_high"] < 0)


def pair_result(
    name: str, roles: dict[str, str], seeds: list[int], tables: list[PairTable], bootstrap: BootstrapConfig
) -> PairResult:
    """Aggregate one pair's tables (one per seed, in ``seeds`` order; each holds every role's row)."""
    out = PairResult(name, roles, list(seeds))
    rows = [{r.label: r for r in t.rows} for t in tables]
    for role, label in roles.items():
        out.values[role] = {}
        for title, metric, error in COLUMNS:
            if role == "old" and metric in _FLIP_METRICS:
                continue
            cells = [_cell(r[label].summary, metric, error) for r in rows]
            per_seed = [c[0] for c in cells]
            known = [v for v in per_seed if v is not None]
            out.values[role][title] = {
                "per_seed": per_seed,
                "per_seed_ci": [[c[1], c[2]] for c in cells],
                "mean": sum(known) / len(known) if known else None,
                "min": min(known) if known else None,
                "max": max(known) if known else None,
                "n": rows[0][label].summary["metrics"][metric]["n"],
            }
    ref = roles["rcat"]
    for role in (r for r in COMPARED if r in roles):
        label = roles[role]
        out.differences[role] = {}
        for title, metric, error in COLUMNS:
            d = seed_mean_difference(
                [(r[ref].flips, r[label].flips) for r in rows],
                metric,
                n_bootstrap=bootstrap.n_resamples,
                confidence=bootstrap.confidence,
                seed=bootstrap.seed,
            )
            if error and d["value"] is not None:  # an error's difference is minus the accuracy's
                lo, hi = d["ci_low"], d["ci_high"]
                d = {
                    **d,
                    "value": -d["value"],
                    "ci_low": None if hi is None else -hi,
                    "ci_high": None if lo is None else -lo,
                    "per_seed": [None if v is None else -v for v in d["per_seed"]],
                }
            seed_cis = [
                next((x for x in t.differences if x["minus"] == label and x["column"] == title), {}) for t in tables
            ]
            d["seeds_ci_excludes_0"] = sum(_excludes_zero(x) for x in seed_cis)
            d["seed_cis"] = [{k: x.get(k) for k in ("value", "ci_low", "ci_high")} for x in seed_cis]
            out.differences[role][title] = d
    return out


def over_pairs(results: list[PairResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Role -> column -> how many pairs have RCAT lower (CI below 0), higher (CI above 0) or unclear, and the
    mean over pairs of the seed-averaged difference."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for role in COMPARED:
        here = [r.differences[role] for r in results if role in r.differences]
        if not here:
            continue
        out[role] = {}
        for title, _, _ in COLUMNS:
            ds = [h[title] for h in here]
            values = [d["value"] for d in ds if d["value"] is not None]
            out[role][title] = {
                "pairs": len(ds),
                "lower": sum(d["ci_high"] is not None and d["ci_high"] < 0 for d in ds),
                "higher": sum(d["ci_low"] is not None and d["ci_low"] > 0 for d in ds),
                "mean": sum(values) / len(values) if values else None,
            }
            out[role][title]["unclear"] = len(ds) - out[role][title]["lower"] - out[role][title]["higher"]
    return out
