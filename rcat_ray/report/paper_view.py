"""A paper-style table (:mod:`rcat_ray.evaluate.paper_table`) as the pages' ``paper_table`` macro shows it."""

from __future__ import annotations

from typing import Any

from rcat_ray.core.numbers import percent_ci
from rcat_ray.evaluate.paper_table import COLUMNS, PairTable, to_records

__all__ = ["paper_table_view"]


def paper_table_view(pair: PairTable) -> dict[str, Any]:
    """One paper-style table from its records: cells as ``value [low, high]``, the best per column marked, and
    the reference row's paired differences (``*``: the CI excludes 0)."""
    (record,) = to_records([pair])
    columns = [title for title, _, _ in COLUMNS]
    best = {}
    for c in columns:
        values = [r["cells"][c]["value"] for r in record["rows"] if c in r["cells"]]
        values = [v for v in values if v is not None]
        if values:
            best[c] = min(values)
    rows = []
    for r in record["rows"]:
        cells = []
        for c in columns:
            cell = r["cells"].get(c) or {"value": None}
            v = cell["value"]
            text = percent_ci(v, cell.get("ci_low"), cell.get("ci_high"))
            cells.append({"text": text, "best": v is not None and c in best and abs(v - best[c]) < 1e-12})
        rows.append({"label": r["label"], "cells": cells})
    differences = []
    for other in dict.fromkeys(d["minus"] for d in record["differences"]):
        by_col = {d["column"]: d for d in record["differences"] if d["minus"] == other}
        differences.append([other, *(_difference_text(by_col[c]) if c in by_col else "-" for c in columns)])
    return {
        "name": record["name"],
        "reference": record["reference"],
        "columns": columns,
        "rows": rows,
        "differences": differences,
    }


def _difference_text(d: dict[str, Any]) -> str:
    lo, hi = d.get("ci_low"), d.get("ci_high")
    significant = d["value"] is not None and lo is not None and hi is not None and (lo > 0 or hi < 0)
    text = percent_ci(d["value"], lo, hi, sign=True)
    return f"{text} *" if significant else text
