"""The nightly page (``templates/nightly.html.j2``): tonight's verdict, the trend of every gated metric across
nights (with its CI band and its gate line), and tonight's flip report one click away."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.core.flips import METRIC_LABELS
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.nightly.gates import GATE_METRICS
from rcat_ray.report.render import render_page
from rcat_ray.store.result_store import ResultStore

TREND_METRICS = ("nfr", "r_nfr", "s_nfr", "acc", "rob_acc")


def trend_plot(history: pd.DataFrame, gates: dict[str, float | None], pair: str, missing: Sequence[str] = ()) -> bytes:
    """One panel per metric: value and CI band per night, the gate threshold dashed, failed nights in red.

    ``missing``: dates of nights whose history file could not be read; named above the panels, so the plot
    alone (sent around without the page) does not pass a gap off as a complete trend.
    """
    nights = history[history["pair"] == pair].reset_index(drop=True)
    fig = Figure(figsize=(11, 2.4 * len(TREND_METRICS)), dpi=100)
    axes = fig.subplots(len(TREND_METRICS), 1, sharex=True)
    x = list(range(len(nights)))
    for ax, metric in zip(axes, TREND_METRICS, strict=True):
        v = 100 * nights[f"{metric}_value"].astype(float)
        lo = 100 * nights[f"{metric}_ci_low"].astype(float)
        hi = 100 * nights[f"{metric}_ci_high"].astype(float)
        ax.fill_between(x, lo, hi, color="#1f77b4", alpha=0.2, label="95% CI")
        ax.plot(x, v, "-o", color="#1f77b4", ms=4, label=METRIC_LABELS.get(metric, metric))
        failed = nights["verdict"] == "fail"
        ax.scatter([i for i in x if failed[i]], v[failed], color="#d62728", zorder=3, label="failed night")
        for gate, (key, _direction) in GATE_METRICS.items():
            if key == metric and gates.get(gate) is not None:
                ax.axhline(100 * gates[gate], color="#d62728", ls="--", lw=1, label=f"gate {gate}")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(nights["date"].astype(str), rotation=45, ha="right", fontsize=8)
    if missing:
        fig.suptitle(f"Missing (history file unreadable): {', '.join(missing)}", color="#d62728", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_STATES = {True: ("pass", "pass"), False: ("FAIL", "fail"), None: ("not judged", "not")}  # result, row class


def write_nightly_report(
    cfg: NightlyConfig,
    history: pd.DataFrame,
    verdict: dict[str, Any],
    store: ResultStore,
    out: Path,
    skipped: Sequence[dict[str, str]] = (),
) -> Path:
    """Write ``trends.png``, tonight's flip report (``flips/report.html``) and ``report.html`` into ``out``.

    ``skipped``: history nights that could not be read (:func:`rcat_ray.nightly.history.read_history_checked`),
    named on the plot and above it, each with its file and error: a trend with a silent gap would read as a
    complete one.
    """
    from rcat_ray.report.flip_report import CLEAN_GRID_PNG, ROBUST_GRID_PNG, write_report

    write_report(store, verdict["comparison"], out / "flips")
    grids = [
        {"src": f"flips/{name}", "title": title}
        for name, title in (
            (ROBUST_GRID_PNG, "Worst robustness negative flips"),
            (CLEAN_GRID_PNG, "Worst clean negative flips"),
        )
        if (out / "flips" / name).is_file()
    ]
    gates = {g: getattr(cfg.gates, g) for g in GATE_METRICS}
    write_file_atomic(out / "trends.png", trend_plot(history, gates, cfg.pair, [s["date"] for s in skipped]))
    rows = [{**g, "state": _STATES[g["passed"]][0], "row_class": _STATES[g["passed"]][1]} for g in verdict["gates"]]
    page = render_page(
        "nightly.html.j2",
        pair=cfg.pair,
        date=verdict["date"],
        passed=verdict["passed"],
        failing=verdict["failing"],
        baseline=verdict["baseline"],
        candidate=verdict["candidate"],
        gates=rows,
        missing=list(skipped),
        grids=grids,
    )
    return write_file_atomic(out / "report.html", page)
