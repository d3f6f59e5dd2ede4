"""Per-sample flip statistics between an old and a new model (DESIGN 1.1 and 3).

The expensive work -- attacking a model on a dataset -- yields one per-model table. Comparing two models
is a join of two such tables on ``sample_id`` (:func:`flip_table`) followed by a reduction to rates with
paired bootstrap confidence intervals (:func:`summarize`, :func:`paired_difference`). Everything here is
pure numpy/pyarrow so a comparison is instant and testable without Ray or torch.

How the bootstrap is made cheap: every metric is a function of how many rows fall into each of the 16
combinations of the four flags ``(c_old, c_new, r_old, r_new)``. Each row is therefore encoded as one
small integer code, a resample is a row of an index matrix, and one ``np.bincount`` over
``code + 16 * resample`` turns all resamples into a ``(n_bootstrap, 16)`` count matrix from which every
metric is computed at once. Comparing two flip tables uses the joint code of both (256 combinations), so
the resampling is paired across tables as well as across the old and new model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rcat_ray.errors import FlipInputError

__all__ = [
    "FLIP_SCHEMA",
    "METRICS",
    "METRIC_LABELS",
    "ROBUST_METRICS",
    "FlipInputError",
    "flip_table",
    "format_summary",
    "paired_difference",
    "summarize",
]

# --------------------------------------------------------------------------------------------------
# Schemas and metric names
# --------------------------------------------------------------------------------------------------

FLIP_SCHEMA: Final[pa.Schema] = pa.schema(
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("old_clean_correct", pa.bool_(), nullable=False),
        pa.field("new_clean_correct", pa.bool_(), nullable=False),
        pa.field("old_robust", pa.bool_(), nullable=True),
        pa.field("new_robust", pa.bool_(), nullable=True),
        pa.field("neg_flip", pa.bool_(), nullable=False),
        pa.field("pos_flip", pa.bool_(), nullable=False),
        pa.field("robust_neg_flip", pa.bool_(), nullable=True),
        pa.field("robust_pos_flip", pa.bool_(), nullable=True),
        pa.field("old_clean_margin", pa.float32(), nullable=False),
        pa.field("new_clean_margin", pa.float32(), nullable=False),
        pa.field("old_adv_margin", pa.float32(), nullable=True),
        pa.field("new_adv_margin", pa.float32(), nullable=True),
    ]
)
"""Schema of the comparison of two per-model tables, one row per sample, sorted by ``sample_id``."""

# Columns of a per-model table that a comparison reads, with the type each is cast to and whether
# nulls are allowed. ``robust`` / ``adv_margin`` are null for samples that were not attacked (robust
# metrics may be evaluated on fewer samples than clean ones).
_MODEL_COLUMNS: Final[dict[str, tuple[pa.DataType, bool]]] = {
    "sample_id": (pa.int64(), False),
    "label": (pa.int32(), False),
    "clean_correct": (pa.bool_(), False),
    "robust": (pa.bool_(), True),
    "clean_margin": (pa.float32(), False),
    "adv_margin": (pa.float32(), True),
}

_CLEAN_METRICS: Final[tuple[str, ...]] = ("acc_old", "acc", "nfr", "pfr", "relative_nfr")
ROBUST_METRICS: Final[tuple[str, ...]] = (
    "rob_acc_old",
    "rob_acc",
    "r_nfr",
    "r_pfr",
    "b_nfr",
    "s_nfr",
    "nfr_robust_subset",
)
"""Metrics computed on the robust sample set (rows where both models were attacked).

``nfr_robust_subset`` is the clean NFR on that same set: when robust metrics use fewer samples than clean
ones, it is the NFR for which ``s_nfr == nfr_robust_subset + r_nfr - b_nfr`` holds on one N (DESIGN 1.1)."""

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
}
"""Human-readable metric names (the paper's spelling) for tables and plots."""

# Above this many index-matrix elements per block the bootstrap is drawn in blocks of resamples, so
# memory stays bounded (about 4 bytes per element for the indices plus 4 for the gathered codes).
_MAX_BLOCK_ELEMENTS: int = 8_000_000

# --------------------------------------------------------------------------------------------------
# Row codes: one small integer per row holding the four flags
# --------------------------------------------------------------------------------------------------

_N_CODES: Final[int] = 16
_CODES: Final[np.ndarray] = np.arange(_N_CODES)
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
}
_INDICATORS = {key: mask.astype(np.float64) for key, mask in _INDICATORS.items()}


# --------------------------------------------------------------------------------------------------
# flip_table
# --------------------------------------------------------------------------------------------------


def _prepare_model_table(table: pa.Table, which: str) -> pa.Table:
    """Select, type-check and sort one per-model table, so the join reduces to aligned arrays."""
    if not isinstance(table, pa.Table):
        raise FlipInputError(f"{which} table must be a pyarrow.Table, got {type(table).__name__}")
    missing = [name for name in _MODEL_COLUMNS if name not in table.column_names]
    if missing:
        raise FlipInputError(f"{which} table is missing column(s) {missing}; has {table.column_names}")
    columns = {}
    for name, (dtype, nullable) in _MODEL_COLUMNS.items():
        column = table.column(name)
        if column.type != dtype:
            try:
                column = column.cast(dtype)  # safe cast: fails on overflow / lossy conversion
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise FlipInputError(
                    f"{which} table column {name!r} has type {table.column(name).type}, "
                    f"which cannot be read as {dtype}: {exc}"
                ) from exc
        if not nullable and column.null_count:
            raise FlipInputError(f"{which} table column {name!r} has {column.null_count} null value(s)")
        columns[name] = column
    prepared = pa.table(columns)
    prepared = prepared.take(pc.sort_indices(prepared.column("sample_id"))).combine_chunks()
    ids = prepared.column("sample_id").to_numpy()
    duplicated = ids[1:][ids[1:] == ids[:-1]]
    if duplicated.size:
        raise FlipInputError(
            f"{which} table has {np.unique(duplicated).size} duplicated sample_id(s), e.g. {int(duplicated[0])}"
        )
    return prepared


def _describe_id_mismatch(
    first_ids: np.ndarray, second_ids: np.ndarray, first: str = "old", second: str = "new"
) -> str:
    """Say how the id sets differ, so a user can tell a wrong split from a truncated evaluation."""
    only_first = np.setdiff1d(first_ids, second_ids, assume_unique=True)
    only_second = np.setdiff1d(second_ids, first_ids, assume_unique=True)
    parts = [
        (
            f"the tables hold different sample_id sets: {only_first.size} id(s) only in {first}, "
            f"{only_second.size} id(s) only in {second} ({first} has {first_ids.size} rows, "
            f"{second} has {second_ids.size})"
        )
    ]
    if only_first.size:
        parts.append(f"first only in {first}: {int(only_first[0])}")
    if only_second.size:
        parts.append(f"first only in {second}: {int(only_second[0])}")
    return "; ".join(parts)


def _bool_with_validity(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls read as False, validity mask): numpy has no nullable bool."""
    values = pc.fill_null(column, False).to_numpy(zero_copy_only=False).astype(bool)
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False).astype(bool)
    return values, valid


def flip_table(old: pa.Table, new: pa.Table) -> pa.Table:
    """Join an old and a new model's per-model tables on ``sample_id`` into a flip table.

    Why strict: a comparison is only meaningful if both models were evaluated on exactly the same
    samples with the same labels; silently inner-joining would hide a wrong split or a truncated run
    and bias every rate. So both tables must hold the same set of ``sample_id`` (else
    :class:`FlipInputError` says how many ids are only in old / only in new) and agree on every label
    (else :class:`FlipInputError` names an example id).

    The result follows :data:`FLIP_SCHEMA`, sorted by ``sample_id``. ``old_robust``/``new_robust`` keep
    the nulls of the inputs (sample not attacked), and the robust flips are null wherever either
    model's robust flag is null, so the robust sample set of a comparison is the set of samples that
    were attacked against both models.
    """
    old_t = _prepare_model_table(old, "old")
    new_t = _prepare_model_table(new, "new")

    old_ids = old_t.column("sample_id").to_numpy()
    new_ids = new_t.column("sample_id").to_numpy()
    if old_ids.shape != new_ids.shape or not np.array_equal(old_ids, new_ids):
        raise FlipInputError(_describe_id_mismatch(old_ids, new_ids))

    old_labels = old_t.column("label").to_numpy()
    new_labels = new_t.column("label").to_numpy()
    mismatch = np.flatnonzero(old_labels != new_labels)
    if mismatch.size:
        first = int(mismatch[0])
        raise FlipInputError(
            f"the tables disagree on the label of {mismatch.size} sample(s), e.g. sample_id "
            f"{int(old_ids[first])}: old says {int(old_labels[first])}, new says {int(new_labels[first])}"
        )

    c_old = old_t.column("clean_correct").to_numpy(zero_copy_only=False).astype(bool)
    c_new = new_t.column("clean_correct").to_numpy(zero_copy_only=False).astype(bool)
    r_old, r_old_valid = _bool_with_validity(old_t.column("robust"))
    r_new, r_new_valid = _bool_with_validity(new_t.column("robust"))
    both_attacked = r_old_valid & r_new_valid

    columns = [
        old_t.column("sample_id"),
        old_t.column("label"),
        pa.array(c_old, pa.bool_()),
        pa.array(c_new, pa.bool_()),
        old_t.column("robust"),
        new_t.column("robust"),
        pa.array(c_old & ~c_new, pa.bool_()),
        pa.array(~c_old & c_new, pa.bool_()),
        pa.array(r_old & ~r_new, pa.bool_(), mask=~both_attacked),
        pa.array(~r_old & r_new, pa.bool_(), mask=~both_attacked),
        old_t.column("clean_margin"),
        new_t.column("clean_margin"),
        old_t.column("adv_margin"),
        new_t.column("adv_margin"),
    ]
    return pa.Table.from_arrays(columns, schema=FLIP_SCHEMA)


# --------------------------------------------------------------------------------------------------
# Metrics from code counts
# --------------------------------------------------------------------------------------------------


def _flip_arrays(flips: pa.Table, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row codes, robust-set mask, labels) of a flip table: all the bootstrap needs."""
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
) -> dict[str, Any]:
    """Reduce a flip table to every DESIGN 1.1 metric with its N and a paired bootstrap CI, also per class.

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
    codes, robust_set, labels = _flip_arrays(flips, "flips")

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

    return {
        "n_clean": n_clean,
        "n_robust": n_robust,
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
    ids_a, codes_a, robust_a, labels_a = _aligned(flips_a, "flips_a")
    ids_b, codes_b, robust_b, labels_b = _aligned(flips_b, "flips_b")
    if ids_a.shape != ids_b.shape or not np.array_equal(ids_a, ids_b):
        raise FlipInputError(_describe_id_mismatch(ids_a, ids_b, "flips_a", "flips_b"))
    mismatch = np.flatnonzero(labels_a != labels_b)
    if mismatch.size:
        raise FlipInputError(
            f"the flip tables disagree on the label of {mismatch.size} sample(s), e.g. sample_id "
            f"{int(ids_a[mismatch[0]])}"
        )

    rows = robust_a & robust_b if metric in ROBUST_METRICS else np.ones(ids_a.size, dtype=bool)
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


# --------------------------------------------------------------------------------------------------
# Text rendering
# --------------------------------------------------------------------------------------------------


def _pct(value: float | None, width: int = 7) -> str:
    """Format a rate in percent ('-' when undefined), right-aligned so columns line up."""
    return f"{'-':>{width}}" if value is None else f"{100.0 * value:{width}.2f}"


def format_summary(summary: Mapping[str, Any], *, per_class: bool = True) -> str:
    """Render a :func:`summarize` result as a fixed-width text table for a terminal.

    Rates are shown in percent with their confidence interval and their own N, because a reader must
    see that clean and robust numbers may rest on different sample counts. The per-class table shows
    values only (no intervals) to stay readable at 80-100 columns.
    """
    confidence = summary.get("bootstrap", {}).get("confidence", 0.95)
    ci_header = f"{round(100 * confidence, 2):g}% CI"
    width = max(14, *(len(label) + 2 for label in METRIC_LABELS.values()))
    lines = [f"{'metric':<{width}}{'value %':>9}  {ci_header:^19}{'N':>9}"]
    lines.append("-" * len(lines[0]))
    for key in METRICS:
        entry = summary["metrics"].get(key)
        if entry is None:
            continue
        if entry["ci_low"] is None or entry["ci_high"] is None:
            ci = f"{'-':^19}"
        else:
            ci = f"[{_pct(entry['ci_low'], 6)}, {_pct(entry['ci_high'], 6)}]"
            ci = f"{ci:^19}"
        lines.append(f"{METRIC_LABELS[key]:<{width}}{_pct(entry['value'], 9)}  {ci}{entry['n']:>9}")

    classes = summary.get("per_class") or []
    if per_class and classes:
        shown = ("acc", "nfr", "pfr", "rob_acc", "r_nfr", "r_pfr", "s_nfr")
        name_width = max(5, *(len(str(c["name"])) for c in classes)) + 1
        header = f"{'class':<{name_width}}{'N':>7}{'N rob':>7}" + "".join(f"{METRIC_LABELS[key]:>8}" for key in shown)
        lines += ["", "per class (values in %)", header, "-" * len(header)]
        for c in classes:
            values = "".join(_pct(c["metrics"][key]["value"], 8) for key in shown)
            lines.append(f"{c['name']!s:<{name_width}}{c['n_clean']:>7}{c['n_robust']:>7}{values}")
    return "\n".join(lines)
