"""Summaries of flip tables with paired bootstrap confidence intervals, overall and per class.

A resample is a row of an index matrix, and one ``np.bincount`` over ``code + 16 * resample`` turns all
resamples into a ``(n_bootstrap, 16)`` count matrix from which every metric is computed at once
(:mod:`.metrics`). Comparing two flip tables uses the joint code of both (256 combinations), so the
resampling is paired across tables as well as across the old and new model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from rcat_ray.core.flips.metrics import (
    _N_CODES,
    METRICS,
    NEAR_MARGIN,
    ROBUST_METRICS,
    _flip_arrays,
    _metric_from_counts,
)
from rcat_ray.core.flips.table import _describe_id_mismatch
from rcat_ray.errors import FlipInputError

# Above this many index-matrix elements per block the bootstrap is drawn in blocks of resamples, so
# memory stays bounded (about 4 bytes per element for the indices plus 4 for the gathered codes).
_MAX_BLOCK_ELEMENTS: int = 8_000_000


def _bootstrap_counts(codes: np.ndarray, n_codes: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Code counts of ``n_bootstrap`` resamples (with replacement) of the rows, shape (B, n_codes).

    Resampling whole rows keeps everything known about a sample (old and new, clean and robust, and
    in a paired comparison both flip tables) together, which is what makes the intervals paired.
    The index matrix is drawn in blocks of resamples so memory stays bounded for large N.
    """
    n = codes.size
    out = np.zeros((n_bootstrap, n_codes), dtype=np.int64)
    if n == 0 or n_bootstrap == 0:
        return out
    index_dtype = np.int32 if n < 2**31 else np.int64
    key_dtype = np.int32 if n_bootstrap * n_codes < 2**31 else np.int64
    block = max(1, _MAX_BLOCK_ELEMENTS // n)
    for start in range(0, n_bootstrap, block):
        size = min(block, n_bootstrap - start)
        index = rng.integers(0, n, size=(size, n), dtype=index_dtype)
        keys = codes[index].astype(key_dtype)
        keys += (np.arange(size, dtype=key_dtype) * n_codes)[:, None]
        out[start : start + size] = np.bincount(keys.ravel(), minlength=size * n_codes).reshape(size, n_codes)
    return out


def _interval(stats: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    """Percentile interval; resamples where the metric is undefined (nan) are left out."""
    finite = stats[np.isfinite(stats)]
    if finite.size == 0:
        return None, None
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _json_float(value: float) -> float | None:
    """JSON has no nan: an undefined value is reported as null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _metric_entry(value: float, stats: np.ndarray | None, n: int, confidence: float) -> dict[str, Any]:
    """One metric's summary entry; an empty sample set gives nulls rather than a crash."""
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    low, high = (None, None) if stats is None else _interval(stats, confidence)
    return {"value": _json_float(value), "ci_low": low, "ci_high": high, "n": int(n)}


def _check_bootstrap_args(n_bootstrap: int, confidence: float, seed: int) -> None:
    """Reject settings that would silently give meaningless intervals."""
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative int, got {n_bootstrap!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _margins_known(flips: pa.Table, robust_set: np.ndarray) -> bool:
    """Whether the new model's lowest margin under attack is known on every sample attacked for both models."""
    if "new_min_margin" not in flips.column_names:
        return False
    known = flips.column("new_min_margin").is_valid().to_numpy(zero_copy_only=False)
    return bool(known[robust_set].all())


def _group_metrics(
    codes: np.ndarray, robust_set: np.ndarray, n_bootstrap: int, confidence: float, rng: np.random.Generator
) -> tuple[dict[str, dict[str, Any]], int, int]:
    """All metrics of one group of rows (the whole table or one class), each over its own sample set."""
    clean_codes = codes
    robust_codes = codes[robust_set]
    clean_counts = np.bincount(clean_codes, minlength=_N_CODES)
    robust_counts = np.bincount(robust_codes, minlength=_N_CODES)
    clean_boot: np.ndarray | None = None
    robust_boot: np.ndarray | None = None
    if n_bootstrap > 0:
        clean_boot = _bootstrap_counts(clean_codes, _N_CODES, n_bootstrap, rng)
        if robust_codes.size == clean_codes.size:
            # Every row was attacked: reuse the same resamples, so identities between clean and
            # robust metrics (S-NFR = NFR + R-NFR - B-NFR) also hold resample by resample.
            robust_boot = clean_boot
        else:
            robust_boot = _bootstrap_counts(robust_codes, _N_CODES, n_bootstrap, rng)
    metrics: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        robust = metric in ROBUST_METRICS
        counts = robust_counts if robust else clean_counts
        boot = robust_boot if robust else clean_boot
        stats = None if boot is None else _metric_from_counts(metric, boot)
        metrics[metric] = _metric_entry(_metric_from_counts(metric, counts), stats, int(counts.sum()), confidence)
    return metrics, int(clean_counts.sum()), int(robust_counts.sum())


def summarize(
    flips: pa.Table,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    near_margin: float = NEAR_MARGIN,
) -> dict[str, Any]:
    """Reduce a flip table to every metric (docs/contracts.md) with its N and a paired bootstrap CI, also per class.

    Why these choices:

    * Each metric is a rate over its *own* sample set, denominator its own N: the clean set is every
      row, the robust set is the rows where both robust flags are non-null (robust evaluation is often
      run on fewer samples than clean, e.g. 2k of 10k). ``b_nfr`` and ``s_nfr`` are computed on the
      robust set, as means of ``neg & r_neg`` and ``neg | r_neg``, and ``nfr_robust_subset`` is the
      clean NFR on that same set, so ``s_nfr == nfr_robust_subset + r_nfr - b_nfr`` always holds on one
      N (also resample by resample). ``nfr`` itself uses every row; it equals ``nfr_robust_subset``
      when every row was attacked.
    * ``relative_nfr = nfr / ((1 - err_old) * err_new)`` (PCT paper) is nan -- null in the output --
      when its denominator is 0.
    * Intervals are percentile bootstrap intervals over samples, *paired*: rows of the flip table
      are resampled, so a sample's old and new flags always travel together and the correlation
      between the two models (which is what makes flips rare) is kept. Per-class intervals resample
      within the class. Resamples where a metric is undefined are left out of its interval.
    * Deterministic for a given ``seed``: the overall numbers use ``np.random.default_rng(seed)`` and
      class ``c`` uses ``np.random.default_rng([seed, c])``, so adding a class does not change the
      other intervals.

    Returns a plain, ``json.dumps(..., allow_nan=False)``-able dict::

        {"n_clean": int, "n_robust": int,
         "bootstrap": {"n_resamples": int, "confidence": float, "seed": int},
         "metrics": {key: {"value", "ci_low", "ci_high", "n"} for key in METRICS},
         "per_class": [{"class": int, "name": str, "n_clean": int, "n_robust": int,
                        "metrics": {...same keys...}}, ...]}

    A metric whose sample set is empty has value/ci None and n 0. Classes are ``0..num_classes-1`` if
    ``num_classes`` (or ``class_names``) is given -- so a class absent from the data is still listed --
    else the labels present.
    """
    _check_bootstrap_args(n_bootstrap, confidence, seed)
    codes, robust_set, labels = _flip_arrays(flips, "flips", near_margin)

    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if num_classes is None:
            num_classes = len(class_names)
        elif len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}")
    if labels.size and labels.min() < 0:
        raise FlipInputError(f"labels must be non-negative class indices, found {int(labels.min())}")
    if num_classes is not None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be non-negative, got {num_classes}")
        if labels.size and labels.max() >= num_classes:
            raise FlipInputError(f"label {int(labels.max())} is out of range for num_classes={num_classes}")
        classes = list(range(num_classes))
    else:
        classes = [int(c) for c in np.unique(labels)]

    metrics, n_clean, n_robust = _group_metrics(codes, robust_set, n_bootstrap, confidence, np.random.default_rng(seed))

    per_class = []
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    for cls in classes:
        lo, hi = np.searchsorted(sorted_labels, [cls, cls + 1])
        rows = order[lo:hi]
        cls_metrics, cls_clean, cls_robust = _group_metrics(
            codes[rows], robust_set[rows], n_bootstrap, confidence, np.random.default_rng([seed, cls])
        )
        per_class.append(
            {
                "class": cls,
                "name": class_names[cls] if class_names is not None else str(cls),
                "n_clean": cls_clean,
                "n_robust": cls_robust,
                "metrics": cls_metrics,
            }
        )

    if not _margins_known(flips, robust_set):  # tables stored before min_margin existed: no near-flip rate
        for group in (metrics, *(c["metrics"] for c in per_class)):
            group["near_flip"] = {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    return {
        "n_clean": n_clean,
        "n_robust": n_robust,
        "near_margin": float(near_margin),
        "bootstrap": {"n_resamples": int(n_bootstrap), "confidence": float(confidence), "seed": int(seed)},
        "metrics": metrics,
        "per_class": per_class,
    }


# --------------------------------------------------------------------------------------------------
# Paired comparison of two flip tables
# --------------------------------------------------------------------------------------------------


def _aligned(flips: pa.Table, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, codes, robust-set mask, labels) sorted by sample_id, for row-by-row pairing."""
    codes, robust_set, labels = _flip_arrays(flips, what)
    ids_column = flips.column("sample_id")
    if ids_column.null_count:
        raise FlipInputError(f"{what} column 'sample_id' has null values")
    ids = ids_column.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
        raise FlipInputError(f"{what} has duplicated sample_ids")
    return ids, codes[order], robust_set[order], labels[order]


def paired_codes(
    flips_a: pa.Table, flips_b: pa.Table, names: tuple[str, str] = ("flips_a", "flips_b")
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, codes of a, codes of b, robust set of both) of two flip tables over the same samples, row by
    row; :class:`FlipInputError` when their sample ids or labels differ."""
    ids_a, codes_a, robust_a, labels_a = _aligned(flips_a, names[0])
    ids_b, codes_b, robust_b, labels_b = _aligned(flips_b, names[1])
    if ids_a.shape != ids_b.shape or not np.array_equal(ids_a, ids_b):
        raise FlipInputError(_describe_id_mismatch(ids_a, ids_b, *names))
    mismatch = np.flatnonzero(labels_a != labels_b)
    if mismatch.size:
        raise FlipInputError(
            f"the flip tables disagree on the label of {mismatch.size} sample(s), e.g. sample_id "
            f"{int(ids_a[mismatch[0]])}"
        )
    return ids_a, codes_a, codes_b, robust_a & robust_b


def paired_difference(
    flips_a: pa.Table,
    flips_b: pa.Table,
    metric: str,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``metric(a) - metric(b)`` with a paired bootstrap CI, for two updates of the same old model.

    Why paired: "does RCAT flip fewer samples than AT?" is asked of two flip tables over the same
    samples and the same old model (e.g. RCAT-vs-old and AT-vs-old); the two rates are strongly
    correlated through the samples, so comparing their separate intervals is far too conservative.
    Each resample draws one set of sample indices and uses it for both tables (the two tables' codes
    are combined into one of 256 joint codes per sample), so the interval is that of the difference.

    Both tables must hold the same ``sample_id`` set with the same labels (else :class:`FlipInputError`).
    Clean metrics use every sample; robust metrics use the samples in the robust set of *both*
    tables. Returns ``{"metric", "value", "ci_low", "ci_high", "n"}``; value/CI are None when the
    sample set is empty or the metric is undefined (relative NFR with a zero denominator).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")
    _check_bootstrap_args(n_bootstrap, confidence, seed)
    ids_a, codes_a, codes_b, robust_both = paired_codes(flips_a, flips_b)
    rows = robust_both if metric in ROBUST_METRICS else np.ones(ids_a.size, dtype=bool)
    joint = codes_a[rows].astype(np.int32) * _N_CODES + codes_b[rows]
    n = int(joint.size)
    result: dict[str, Any] = {"metric": metric, "value": None, "ci_low": None, "ci_high": None, "n": n}
    if n == 0:
        return result

    def difference(joint_counts: np.ndarray) -> np.ndarray:
        grid = joint_counts.reshape(*joint_counts.shape[:-1], _N_CODES, _N_CODES)
        return _metric_from_counts(metric, grid.sum(axis=-1)) - _metric_from_counts(metric, grid.sum(axis=-2))

    result["value"] = _json_float(difference(np.bincount(joint, minlength=_N_CODES**2)))
    if n_bootstrap > 0:
        boot = _bootstrap_counts(joint, _N_CODES**2, n_bootstrap, np.random.default_rng(seed))
        result["ci_low"], result["ci_high"] = _interval(difference(boot), confidence)
    return result
