"""The nightly history: a Parquet dataset partitioned by date, one row per (night, pair).

Each night writes its own file, ``date=YYYY-MM-DD/<run id>.parquet``, atomically and never over another:
earlier nights are never rewritten, and two runs writing at once both land. Any pyarrow filesystem URI
works, so the history can live in object storage next to the result store.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from rcat_ray.core.flips import METRICS
from rcat_ray.gates import GATE_METRICS
from rcat_ray.store import ResultStore

_STRINGS = ("run_id", "timestamp", "pair", "baseline", "baseline_fingerprint", "candidate", "candidate_fingerprint",
            "candidate_path", "verdict", "failing", "comparison")  # fmt: skip
_INTS = ("n_clean", "n_robust", "baseline_chunks_computed", "candidate_chunks_computed")

#: Fixed column types, so every night's file has the same schema whatever is null that night.
HISTORY_SCHEMA = pa.schema(
    [pa.field(k, pa.string()) for k in _STRINGS]
    + [pa.field(k, pa.int64()) for k in _INTS]
    + [pa.field(f"{m}_{part}", pa.float64()) for m in METRICS for part in ("value", "ci_low", "ci_high")]
    + [pa.field(f"gate_{g}", pa.float64()) for g in GATE_METRICS]
)


def history_row(**fields: Any) -> dict[str, Any]:
    """A row with every history column (missing ones null)."""
    return {name: fields.get(name) for name in HISTORY_SCHEMA.names}


def append_night(root: str, date: str, row: dict[str, Any]) -> str:
    """Write one night's row as its own file under ``date=<date>/``; returns its path."""
    store = ResultStore(root)
    rel = f"date={date}/{row['run_id']}.parquet"
    table = pa.Table.from_pylist([history_row(**row)], schema=HISTORY_SCHEMA)
    if not store.put_table(rel, table):
        raise FileExistsError(f"history already holds {store.path(rel)}")
    return store.path(rel)


def read_history(root: str) -> pd.DataFrame:
    """Every night so far, oldest first (an empty frame when there is no history yet)."""
    store = ResultStore(root)
    if not store.exists(""):
        return pd.DataFrame(columns=["date", *HISTORY_SCHEMA.names])
    # the schema is given, not inferred, so nights written before a metric was added read with it as null
    date = pa.schema([pa.field("date", pa.string())])
    dataset = pads.dataset(store.root, filesystem=store.fs, format="parquet",
                           partitioning=pads.partitioning(date, flavor="hive"),
                           schema=pa.unify_schemas([HISTORY_SCHEMA, date]),
                           exclude_invalid_files=True, ignore_prefixes=[".", "_"])  # fmt: skip
    df = dataset.to_table().to_pandas()
    if df.empty:
        return df
    df["date"] = df["date"].astype(str)
    return df.sort_values(["timestamp", "run_id"], kind="mergesort").reset_index(drop=True)
