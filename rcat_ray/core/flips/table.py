"""The flip table: two per-model tables joined on ``sample_id``, one row per sample with both models' flags.

Schema (:data:`FLIP_SCHEMA`) and the per-model columns it reads: docs/contracts.md.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rcat_ray.errors import FlipInputError

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
        pa.field("old_min_margin", pa.float32(), nullable=True),
        pa.field("new_min_margin", pa.float32(), nullable=True),
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
    "min_margin": (pa.float32(), True),
}
#: columns a per-model table may lack (written before they existed): read as nulls
_OPTIONAL_COLUMNS: Final[frozenset[str]] = frozenset({"min_margin"})


def _prepare_model_table(table: pa.Table, which: str) -> pa.Table:
    """Select, type-check and sort one per-model table, so the join reduces to aligned arrays."""
    if not isinstance(table, pa.Table):
        raise FlipInputError(f"{which} table must be a pyarrow.Table, got {type(table).__name__}")
    missing = [name for name in _MODEL_COLUMNS if name not in table.column_names and name not in _OPTIONAL_COLUMNS]
    if missing:
        raise FlipInputError(f"{which} table is missing column(s) {missing}; has {table.column_names}")
    columns = {}
    for name, (dtype, nullable) in _MODEL_COLUMNS.items():
        if name not in table.column_names:
            columns[name] = pa.nulls(table.num_rows, dtype)
            continue
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
        old_t.column("min_margin"),
        new_t.column("min_margin"),
    ]
    return pa.Table.from_arrays(columns, schema=FLIP_SCHEMA)
