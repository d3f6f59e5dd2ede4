"""The paper-style table (docs/contracts.md §1.4): per old -> new pair, rows old, new and each fine-tuned model;
columns clean error, NFR, robust error, R-NFR, S-NFR with their CIs; the best per column marked; and
every paired difference of the reference row (RCAT) minus each other row, with its CI.

Ray-free: it reads the flip tables and summaries of stored comparisons, each against the pair's old model.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rcat_ray.core.flips import paired_difference
from rcat_ray.core.numbers import percent_ci

#: (column title, summary metric, transform): errors are 1 - accuracy.
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("clean error", "acc", True),
    ("NFR", "nfr", False),
    ("robust error", "rob_acc", True),
    ("R-NFR", "r_nfr", False),
    ("S-NFR", "s_nfr", False),
)
_FLIP_COLUMNS = {"nfr", "r_nfr", "s_nfr", "r_nfr_confirmed"}
#: shown when every compared row carries it (``table`` with ``confirm``): R-NFR with each flip re-checked
CONFIRMED_COLUMN = ("R-NFR confirmed", "r_nfr_confirmed", False)


def columns(pair: PairTable) -> tuple[tuple[str, str, bool], ...]:
    """The pair's columns: the paper's five, and R-NFR confirmed when its flips were re-checked."""
    compared = [r for r in pair.rows if not r.is_old]
    if compared and all("r_nfr_confirmed" in r.summary["metrics"] for r in compared):
        return (*COLUMNS, CONFIRMED_COLUMN)
    return COLUMNS


@dataclass
class TableRow:
    """One model of a pair, compared against the pair's old model."""

    label: str
    summary: dict[str, Any]
    flips: pa.Table
    is_old: bool = False
    comparison_key: str | None = None  # the stored comparison behind the row (for reports)


@dataclass
class PairTable:
    """All rows of one old -> new pair and the paired differences of the reference row."""

    name: str
    rows: list[TableRow]
    reference: str | None
    differences: list[dict[str, Any]] = field(default_factory=list)


def _cell(summary: dict[str, Any], metric: str, error: bool) -> tuple[float | None, float | None, float | None]:
    m = summary["metrics"][metric]
    if m["value"] is None:
        return None, None, None
    if not error:
        return m["value"], m["ci_low"], m["ci_high"]
    lo = None if m["ci_high"] is None else 1 - m["ci_high"]
    hi = None if m["ci_low"] is None else 1 - m["ci_low"]
    return 1 - m["value"], lo, hi


def build_pair_table(
    name: str,
    rows: list[TableRow],
    *,
    reference: str | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairTable:
    """Compute the reference row's paired differences against every other row (same samples, same old model)."""
    if reference is None:
        reference = next((r.label for r in rows if r.label.upper().startswith("RCAT")), None)
    table = PairTable(name, rows, reference)
    ref = next((r for r in rows if r.label == reference), None)
    if ref is None:
        return table
    for other in rows:
        if other is ref:
            continue
        for title, metric, error in COLUMNS:
            if other.is_old and metric in _FLIP_COLUMNS:
                continue  # the old model has no flips against itself
            d = paired_difference(
                ref.flips, other.flips, metric, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed
            )
            if error and d["value"] is not None:  # error difference = -(accuracy difference)
                d = {**d, "value": -d["value"], "ci_low": -d["ci_high"], "ci_high": -d["ci_low"]}
            table.differences.append({"minus": other.label, "column": title, **d})
    return table


def _best(pair: PairTable) -> dict[str, float]:
    best: dict[str, float] = {}
    for title, metric, error in columns(pair):
        values = [_cell(r.summary, metric, error)[0] for r in pair.rows if not (r.is_old and metric in _FLIP_COLUMNS)]
        values = [v for v in values if v is not None]
        if values:
            best[title] = min(values)
    return best


def _signed(d: dict[str, Any]) -> str:
    """A paired difference with its CI, starred when the CI excludes 0."""
    sig = d["ci_low"] is not None and (d["ci_low"] > 0 or d["ci_high"] < 0)
    return percent_ci(d["value"], d["ci_low"], d["ci_high"], sign=True) + (
        " *" if sig and d["value"] is not None else ""
    )


def _rows_text(pair: PairTable) -> list[list[str]]:
    best = _best(pair)
    out = []
    for r in pair.rows:
        cells = [r.label]
        for title, metric, error in columns(pair):
            if r.is_old and metric in _FLIP_COLUMNS:
                cells.append("-")
                continue
            v, lo, hi = _cell(r.summary, metric, error)
            text = percent_ci(v, lo, hi)
            if v is not None and best.get(title) is not None and abs(v - best[title]) < 1e-12:
                text = f"**{text}**"
            cells.append(text)
        out.append(cells)
    return out


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def to_markdown(pairs: list[PairTable]) -> str:
    """Markdown: one table per pair (values in %, 95% CI in brackets, best per column in bold), then the
    reference row's paired differences (* = the CI excludes 0)."""
    lines = []
    for pair in pairs:
        head = ["model", *[c[0] for c in columns(pair)]]
        lines += [f"### {pair.name}", "", *markdown_table(head, _rows_text(pair))]
        if pair.differences:
            lines += ["", f"Paired differences, {pair.reference} minus each row (points; * = CI excludes 0):", ""]
            rows = []
            for other in dict.fromkeys(d["minus"] for d in pair.differences):
                by_col = {d["column"]: d for d in pair.differences if d["minus"] == other}
                rows.append([other, *(_signed(by_col[c[0]]) if c[0] in by_col else "-" for c in COLUMNS)])
            lines += markdown_table(["minus", *(c[0] for c in COLUMNS)], rows)
        lines.append("")
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    """Text as LaTeX prints it (the characters a table cell or label can hold)."""
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    # "old -> new": an arrow (a bare ">" prints as an inverted question mark in LaTeX's default font encoding)
    return text.replace("->", r"$\rightarrow$").replace("<", r"\textless{}").replace(">", r"\textgreater{}")


def to_latex(pairs: list[PairTable]) -> str:
    """LaTeX tabular per pair (booktabs), best per column in bold."""
    out = []
    for pair in pairs:
        out += [
            f"% {pair.name}",
            r"\begin{tabular}{l" + "r" * len(columns(pair)) + "}",
            r"\toprule",
            "model & " + " & ".join(c[0] for c in columns(pair)) + r" \\",
            r"\midrule",
        ]
        for cells in _rows_text(pair):
            tex = []
            for cell in cells:
                text = latex_escape(cell.strip("*"))
                tex.append(rf"\textbf{{{text}}}" if cell.startswith("**") else text)
            out.append(" & ".join(tex) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def to_csv(pairs: list[PairTable]) -> str:
    """One line per (pair, model, column) and per paired difference, machine-readable."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["pair", "kind", "model", "minus", "column", "value", "ci_low", "ci_high", "n"])
    for pair in pairs:
        for r in pair.rows:
            for title, metric, error in columns(pair):
                if r.is_old and metric in _FLIP_COLUMNS:
                    continue
                v, lo, hi = _cell(r.summary, metric, error)
                w.writerow([pair.name, "value", r.label, "", title, v, lo, hi, r.summary["metrics"][metric]["n"]])
        for d in pair.differences:
            w.writerow(
                [
                    pair.name,
                    "difference",
                    pair.reference,
                    d["minus"],
                    d["column"],
                    d["value"],
                    d["ci_low"],
                    d["ci_high"],
                    d["n"],
                ]
            )
    return buf.getvalue()


def to_records(pairs: list[PairTable]) -> list[dict[str, Any]]:
    """The tables as plain data (``rcat-ray table --json``): per pair, each row's cells and the differences."""
    out = []
    for pair in pairs:
        rows = []
        for r in pair.rows:
            cells = {}
            for title, metric, error in columns(pair):
                if r.is_old and metric in _FLIP_COLUMNS:
                    continue
                v, lo, hi = _cell(r.summary, metric, error)
                cells[title] = {"value": v, "ci_low": lo, "ci_high": hi, "n": r.summary["metrics"][metric]["n"]}
            rows.append({"label": r.label, "comparison": r.comparison_key, "cells": cells})
        out.append({"name": pair.name, "reference": pair.reference, "rows": rows, "differences": pair.differences})
    return out
