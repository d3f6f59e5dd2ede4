"""The comparison metrics (NFR, PFR, R-NFR, ...) as functions of row codes: definitions in docs/contracts.md.

Every metric is a function of how many rows fall into each of the 16 combinations of the four flags
``(c_old, c_new, r_old, r_new)``, so each row is encoded as one small integer code and a metric is computed
from a ``(..., 16)`` count array (which is what makes the bootstrap cheap: :mod:`.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
import pyarrow as pa

from rcat_ray.core.flips.table import _bool_with_validity
from rcat_ray.errors import FlipInputError

_CLEAN_METRICS: Final[tuple[str, ...]] = ("acc_old", "acc", "nfr", "pfr", "relative_nfr")
ROBUST_METRICS: Final[tuple[str, ...]] = (
    "rob_acc_old",
    "rob_acc",
    "r_nfr",
    "r_pfr",
    "b_nfr",
    "s_nfr",
    "nfr_robust_subset",
    "near_flip",
)
"""Metrics computed on the robust sample set (rows where both models were attacked).

``nfr_robust_subset`` is the clean NFR on that same set: when robust metrics use fewer samples than clean
ones, it is the NFR for which ``s_nfr == nfr_robust_subset + r_nfr - b_nfr`` holds on one N (docs/contracts.md)."""

METRICS: Final[tuple[str, ...]] = _CLEAN_METRICS + ROBUST_METRICS
"""Every metric key of a summary, in display order."""

METRIC_LABELS: Final[Mapping[str, str]] = {
    "acc_old": "Acc (old)",
    "acc": "Acc",
    "nfr": "NFR",
    "pfr": "PFR",
    "relative_nfr": "Relative NFR",
    "rob_acc_old": "RobAcc (old)",
    "rob_acc": "RobAcc",
    "r_nfr": "R-NFR",
    "r_pfr": "R-PFR",
    "b_nfr": "B-NFR",
    "s_nfr": "S-NFR",
    "nfr_robust_subset": "NFR (robust set)",
    "near_flip": "Near-flips",
}

#: a sample both models withstand is a near-flip when the new model's lowest margin under attack is below this
NEAR_MARGIN: Final[float] = 0.5

_N_CODES: Final[int] = 32
_CODES: Final[np.ndarray] = np.arange(_N_CODES)
_NEAR: Final[np.ndarray] = (_CODES >> 4) & 1 == 1
_C_OLD: Final[np.ndarray] = (_CODES >> 3) & 1 == 1
_C_NEW: Final[np.ndarray] = (_CODES >> 2) & 1 == 1
_R_OLD: Final[np.ndarray] = (_CODES >> 1) & 1 == 1
_R_NEW: Final[np.ndarray] = _CODES & 1 == 1
_NEG: Final[np.ndarray] = _C_OLD & ~_C_NEW
_R_NEG: Final[np.ndarray] = _R_OLD & ~_R_NEW

# For each "mean of an indicator" metric: which of the 16 codes count as 1 (as 0/1 floats, so that
# ``counts @ indicator`` is the number of rows where the indicator holds).
_INDICATORS: Final[dict[str, np.ndarray]] = {
    "acc_old": _C_OLD,
    "acc": _C_NEW,
    "nfr": _NEG,
    "pfr": ~_C_OLD & _C_NEW,
    "rob_acc_old": _R_OLD,
    "rob_acc": _R_NEW,
    "r_nfr": _R_NEG,
    "r_pfr": ~_R_OLD & _R_NEW,
    "b_nfr": _NEG & _R_NEG,
    "s_nfr": _NEG | _R_NEG,
    "nfr_robust_subset": _NEG,
    "near_flip": _R_OLD & _R_NEW & _NEAR,
}
_INDICATORS = {key: mask.astype(np.float64) for key, mask in _INDICATORS.items()}


def _flip_arrays(
    flips: pa.Table, what: str, near_margin: float = NEAR_MARGIN
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row codes, robust-set mask, labels) of a flip table: all the bootstrap needs. A code holds five flags:
    clean-correct and robust for old and new, and whether the new model's lowest margin under attack is below
    ``near_margin`` (0 where it is unknown)."""
    if not isinstance(flips, pa.Table):
        raise FlipInputError(f"{what} must be a pyarrow.Table, got {type(flips).__name__}")
    needed = ("sample_id", "label", "old_clean_correct", "new_clean_correct", "old_robust", "new_robust")
    missing = [name for name in needed if name not in flips.column_names]
    if missing:
        raise FlipInputError(f"{what} is missing flip-table column(s) {missing}; build it with flip_table()")
    for name in ("label", "old_clean_correct", "new_clean_correct"):
        if flips.column(name).null_count:
            raise FlipInputError(f"{what} column {name!r} has null values")
    c_old = flips.column("old_clean_correct").to_numpy(zero_copy_only=False).astype(bool)
    c_new = flips.column("new_clean_correct").to_numpy(zero_copy_only=False).astype(bool)
    r_old, r_old_valid = _bool_with_validity(flips.column("old_robust"))
    r_new, r_new_valid = _bool_with_validity(flips.column("new_robust"))
    codes = (c_old.astype(np.uint8) << 3) | (c_new.astype(np.uint8) << 2)
    codes |= (r_old.astype(np.uint8) << 1) | r_new.astype(np.uint8)
    if "new_min_margin" in flips.column_names:
        low = flips.column("new_min_margin").to_numpy(zero_copy_only=False).astype(np.float64)  # nulls: nan
        codes |= (np.nan_to_num(low, nan=np.inf) < near_margin).astype(np.uint8) << 4
    labels = flips.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, r_old_valid & r_new_valid, labels


def _metric_from_counts(metric: str, counts: np.ndarray) -> np.ndarray:
    """Metric value(s) from code counts of shape ``(..., 16)``; nan where undefined (empty set, 0/0)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "relative_nfr":
            # NFR / ((1 - err_old) * err_new) = NFR / (acc_old * (1 - acc_new)), from the PCT paper:
            # the NFR one would expect if old and new errors were independent is the denominator.
            nfr = counts @ _INDICATORS["nfr"] / n
            denominator = (counts @ _INDICATORS["acc_old"] / n) * (1.0 - counts @ _INDICATORS["acc"] / n)
            return np.where(denominator > 0, nfr / np.where(denominator > 0, denominator, 1.0), np.nan)
        return counts @ _INDICATORS[metric] / n
