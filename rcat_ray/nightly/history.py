"""The nightly history: a Parquet dataset partitioned by date, one row per (night, pair).

Each night writes its own file, ``date=YYYY-MM-DD/<run id>.parquet``, atomically and never over another:
earlier nights are never rewritten, and two runs writing at once both land. Any pyarrow filesystem URI
works, so the history can live in object storage next to the result store.

A night whose file cannot be read (truncated by a copy, a flipped byte, a column of the wrong type) is left out
of the trends, never silently: :func:`read_history_checked` names it with the error, the nightly report shows
it, and a warning is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from rcat_ray.core.flips import METRICS
from rcat_ray.nightly.gates import GATE_METRICS
from rcat_ray.store.result_store import ResultStore

log = logging.getLogger(__name__)

_STRINGS = (
    "run_id",
    "timestamp",
    "pair",
    "baseline",
    "baseline_fingerprint",
    "candidate",
    "candidate_fingerprint",
    "candidate_path",
    "verdict",
    "failing",
    "comparison",
)
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
    """Every night so far, oldest first (an empty frame when there is no history yet). Nights whose file cannot
    be read are left out with a warning; :func:`read_history_checked` also returns which."""
    return read_history_checked(root)[0]


def read_history_checked(root: str) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Every readable night, oldest first, and the nights left out: ``[{"date", "path", "error"}]``.

    Each file is read on its own first (a night is one small row), so a damaged night costs only itself and is
    named, where the dataset reader's ``exclude_invalid_files`` dropped it without a word and a trend then
    showed a gap nobody could see.
    """
    store = ResultStore(root)
    if not store.exists(""):
        return pd.DataFrame(columns=["date", *HISTORY_SCHEMA.names]), []
    good, skipped = [], []
    for path in _night_files(store):
        error = _unreadable(store, path)
        if error is None:
            good.append(path)
            continue
        night = {"date": _night_date(path), "path": path, "error": error}
        log.warning("history night %s is left out of the trends: %s cannot be read (%s)", night["date"], path, error)
        skipped.append(night)
    # the schema is given, not inferred, so nights written before a metric was added read with it as null
    date = pa.schema([pa.field("date", pa.string())])
    dataset = pads.dataset(
        good,
        filesystem=store.fs,
        format="parquet",
        partitioning=pads.partitioning(date, flavor="hive"),
        partition_base_dir=store.root,
        schema=pa.unify_schemas([HISTORY_SCHEMA, date]),
    )
    df = dataset.to_table().to_pandas()
    if df.empty:
        return df, skipped
    df["date"] = df["date"].astype(str)
    return df.sort_values(["timestamp", "run_id"], kind="mergesort").reset_index(drop=True), skipped


def _night_files(store: ResultStore) -> list[str]:
    """The history's files, as the dataset reader would discover them: hidden and ``_`` names (a write in
    flight, ``_SUCCESS``) are not nights."""
    infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
    base = store.root.rstrip("/") + "/"
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and not any(c.startswith((".", "_")) for c in i.path[len(base) :].split("/"))
    )


def _unreadable(store: ResultStore, path: str) -> str | None:
    """Why one night's file cannot be read with the history's schema, or None."""
    try:
        pads.dataset(path, filesystem=store.fs, format="parquet", schema=HISTORY_SCHEMA).to_table()
    except (OSError, pa.ArrowException) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def _night_date(path: str) -> str:
    """The night's date from its partition folder (``date=YYYY-MM-DD``), or "?" for a file outside one."""
    folders = [c.removeprefix("date=") for c in path.split("/")[:-1] if c.startswith("date=")]
    return folders[-1] if folders else "?"
