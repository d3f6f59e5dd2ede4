"""Confirmed robustness flips: R-NFR and R-PFR with every flip re-checked by a stronger attack.

A robustness negative flip says the old model withstood the attack where the new one did not. When a stronger
attack breaks the old model on that sample, the flip dissolves: the old model was breakable too, the weaker
attack only missed it. Likewise a positive flip dissolves when the stronger attack breaks the new model. Only
the side that withstood is re-attacked (the broken side stays broken under any stronger attack), so the cost is
the number of flips, not N.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from rcat_ray.core.flips.bootstrap import _bootstrap_counts, _check_bootstrap_args, _metric_entry

#: (summary key, flip column, which model's re-check keeps the flip)
CONFIRMED = (("r_nfr_confirmed", "robust_neg_flip", "old"), ("r_pfr_confirmed", "robust_pos_flip", "new"))


def flip_ids(flips: pa.Table) -> dict[str, list[int]]:
    """The samples to re-attack: the old model on its robustness negative flips, the new one on the positive."""
    ids = flips.column("sample_id").to_numpy()
    out = {}
    for _, column, side in CONFIRMED:
        flag = flips.column(column).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        out[side] = [int(i) for i in ids[flag]]
    return out


def confirmed_rates(
    flips: pa.Table,
    holds: Mapping[str, Mapping[int, bool]],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """R-NFR and R-PFR counting only the flips the stronger attack confirmed, over the plain rates' sample set
    (both models attacked), with paired bootstrap CIs, and how many flips it dissolved.

    ``holds[side][sample_id]``: whether that model withstood the stronger attack on that flip.
    """
    _check_bootstrap_args(n_bootstrap, confidence, seed)
    robust_set = flips.column("robust_neg_flip").is_valid().to_numpy(zero_copy_only=False)
    ids = flips.column("sample_id").to_numpy()[robust_set]
    codes = np.zeros(len(ids), dtype=np.int64)
    counts: dict[str, Any] = {}
    for bit, (key, column, side) in enumerate(CONFIRMED):
        flag = flips.column(column).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)[robust_set]
        missing = [int(i) for i in ids[flag] if int(i) not in holds[side]]
        if missing:
            raise ValueError(f"{side} model: no re-check for {len(missing)} flip(s), e.g. sample {missing[0]}")
        kept = flag & np.array([bool(holds[side].get(int(i), False)) for i in ids], dtype=bool)
        codes |= kept.astype(np.int64) << bit
        counts[key.replace("_confirmed", "_flips")] = int(flag.sum())
        counts[key.replace("_confirmed", "_dissolved")] = int((flag & ~kept).sum())
    n = len(codes)
    rng = np.random.default_rng([seed, 3])  # a stream of its own: the summary's intervals stay as they were
    boot = _bootstrap_counts(codes, 4, n_bootstrap, rng) if n_bootstrap and n else None
    out: dict[str, Any] = {}
    for bit, (key, _, _) in enumerate(CONFIRMED):
        mask = ((np.arange(4) >> bit) & 1).astype(np.float64)
        value = float(((codes >> bit) & 1).mean()) if n else float("nan")
        stats = None if boot is None else boot @ mask / n
        out[key] = _metric_entry(value, stats, n, confidence)
    return {**out, **counts}
