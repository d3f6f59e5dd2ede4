"""A paired difference averaged over fine-tuning seeds, with one bootstrap over the shared test samples.

The study compares RCAT with another method on the same pair for several seeds, all on the same test
samples against the same old model. The mean over seeds of ``metric(RCAT_s) - metric(X_s)`` is resampled
with one set of sample indices per resample, used for every seed, so its interval is that of the averaged
difference. It measures the test samples' noise on that average, not the spread between seeds: a report
shows the per-seed values beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from rcat_ray.core.flips.bootstrap import _check_bootstrap_args, _interval, _json_float, paired_codes
from rcat_ray.core.flips.metrics import _N_CODES, METRICS, ROBUST_METRICS, _metric_from_counts
from rcat_ray.errors import FlipInputError

#: Index-matrix elements drawn at once (bounded memory for large N).
_BLOCK_ELEMENTS = 4_000_000


def _difference(metric: str, joint_counts: np.ndarray) -> np.ndarray:
    grid = joint_counts.reshape(*joint_counts.shape[:-1], _N_CODES, _N_CODES)
    return _metric_from_counts(metric, grid.sum(axis=-1)) - _metric_from_counts(metric, grid.sum(axis=-2))


def seed_mean_difference(
    pairs: Sequence[tuple[pa.Table, pa.Table]],
    metric: str,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over ``pairs`` (one (a, b) per seed) of ``metric(a) - metric(b)``, with a paired bootstrap CI.

    Every table must hold the same samples with the same labels. Robust metrics use the samples in the robust
    set of every table. Returns ``{"metric", "value", "ci_low", "ci_high", "n", "seeds", "per_seed"}``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")
    if not pairs:
        raise ValueError("seed_mean_difference needs at least one (a, b) pair of flip tables")
    _check_bootstrap_args(n_bootstrap, confidence, seed)
    aligned = [paired_codes(a, b, (f"seed {i} a", f"seed {i} b")) for i, (a, b) in enumerate(pairs)]
    ids0 = aligned[0][0]
    for i, (ids, *_rest) in enumerate(aligned[1:], start=1):
        if not np.array_equal(ids, ids0):
            raise FlipInputError(f"seed {i}'s flip tables hold other samples than seed 0's")
    rows = np.ones(ids0.size, dtype=bool)
    if metric in ROBUST_METRICS:
        for _, _, _, robust_both in aligned:
            rows &= robust_both
    joints = [(ca[rows].astype(np.int32) * _N_CODES + cb[rows]) for _, ca, cb, _ in aligned]
    n = int(rows.sum())
    size = _N_CODES**2
    per_seed = [_json_float(_difference(metric, np.bincount(j, minlength=size))) for j in joints]
    result: dict[str, Any] = {
        "metric": metric,
        "value": None,
        "ci_low": None,
        "ci_high": None,
        "n": n,
        "seeds": len(pairs),
        "per_seed": per_seed,
    }
    if n == 0 or any(v is None for v in per_seed):
        return result
    result["value"] = float(np.mean(per_seed))
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        stats = np.empty(n_bootstrap)
        block = max(1, _BLOCK_ELEMENTS // n)
        offsets = np.arange(block, dtype=np.int64)[:, None] * size
        for start in range(0, n_bootstrap, block):
            k = min(block, n_bootstrap - start)
            index = rng.integers(0, n, size=(k, n))
            total = np.zeros(k)
            for j in joints:  # the same resampled samples for every seed
                keys = (j[index] + offsets[:k]).ravel()
                counts = np.bincount(keys, minlength=k * size).reshape(k, size)
                total += _difference(metric, counts)
            stats[start : start + k] = total / len(joints)
        result["ci_low"], result["ci_high"] = _interval(stats, confidence)
    return result
