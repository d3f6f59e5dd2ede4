"""The nightly report: tonight's verdict, the trend of every gated metric across nights (with its CI band
and its gate line), and tonight's flip report (worst flipped samples as images) one click away."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from rcat_ray.core.flips import METRIC_LABELS
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.nightly.gates import GATE_METRICS
from rcat_ray.store.result_store import ResultStore, write_file_atomic

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


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def missing_nights_html(skipped: Sequence[dict[str, str]]) -> str:
    """The nights left out of the trends because their history file cannot be read, each with its file and
    error (empty when none): a trend with a silent gap would read as a complete one."""
    if not skipped:
        return ""
    items = "".join(
        f"<li>{html.escape(s['date'])}: <code>{html.escape(s['path'])}</code>: {html.escape(s['error'])}</li>"
        for s in skipped
    )
    head = f"<b>{len(skipped)} night(s) missing from the trends</b> (their history file cannot be read)"
    return f"<p class='missing'>{head}:</p><ul class='missing'>{items}</ul>"


def write_nightly_report(cfg: NightlyConfig, history: pd.DataFrame, verdict: dict[str, Any], store: ResultStore,
                         out: Path, skipped: Sequence[dict[str, str]] = ()) -> Path:  # fmt: skip
    """Write ``trends.png``, tonight's flip report (``flips/report.html``) and ``report.html`` into ``out``.

    ``skipped``: history nights that could not be read (:func:`rcat_ray.nightly.history.read_history_checked`), named
    on the plot and above it.
    """
    from rcat_ray.report.flip_report import CLEAN_GRID_PNG, ROBUST_GRID_PNG, write_report

    write_report(store, verdict["comparison"], out / "flips")
    grids = "".join(
        f'<p>{title}</p><img src="flips/{name}" alt="{title}" style="max-width:100%">'
        for name, title in ((ROBUST_GRID_PNG, "Worst robustness negative flips"),
                            (CLEAN_GRID_PNG, "Worst clean negative flips"))
        if (out / "flips" / name).is_file()
    ) or "<p>No negative flips tonight.</p>"  # fmt: skip
    gates = {g: getattr(cfg.gates, g) for g in GATE_METRICS}
    write_file_atomic(out / "trends.png", trend_plot(history, gates, cfg.pair, [s["date"] for s in skipped]))
    rows = []
    for g in verdict["gates"]:
        state = {True: "pass", False: "FAIL", None: "not judged"}[g["passed"]]
        rows.append(
            f"<tr class='{state.split()[0].lower()}'><td>{html.escape(g['gate'])}</td>"
            f"<td>{html.escape(g['scope'])}</td>"
            f"<td>{fmt(g['threshold'])}</td><td>{fmt(g['value'])} [{fmt(g['ci_low'])}, {fmt(g['ci_high'])}]</td>"
            f"<td>{fmt(g['evidence'])} ({html.escape(g['judged_on'])})</td><td>{state}</td></tr>"
        )  # fmt: skip
    head = "PASS" if verdict["passed"] else "FAIL"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Nightly {html.escape(cfg.pair)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}} tr.fail{{background:#fde2e2}} .verdict{{font-size:1.4em}}
.missing{{color:#a00}}</style>
</head><body>
<h2>Nightly gate: {html.escape(cfg.pair)}, {html.escape(verdict["date"])}</h2>
<p class="verdict"><b>{head}</b>{": " + html.escape(", ".join(verdict["failing"])) if verdict["failing"] else ""}</p>
<p>baseline <code>{html.escape(verdict["baseline"]["name"])}</code> ({verdict["baseline"]["fingerprint"]},
{verdict["baseline"]["chunks_computed"]} chunks attacked tonight, {verdict["baseline"]["chunks_reused"]} reused);
candidate <code>{html.escape(verdict["candidate"]["name"])}</code> ({verdict["candidate"]["fingerprint"]},
{verdict["candidate"]["chunks_computed"]} chunks attacked, {verdict["candidate"]["chunks_reused"]} reused).</p>
<h3>Gates (values in %; a max gate fails when the CI's lower end is above it, a min gate when the upper end is
below it)</h3>
<table><tr><th>gate</th><th>scope</th><th>threshold</th><th>value [95% CI]</th><th>evidence</th><th>result</th></tr>
{"".join(rows) or "<tr><td colspan=6>no gates configured</td></tr>"}</table>
<h3>Trends across nights</h3>
{missing_nights_html(skipped)}
<img src="trends.png" alt="metric trends" style="max-width:100%">
<h3>Tonight's flips</h3>
{grids}
<p><a href="flips/report.html">Full flip report: summary with CIs, per-class flips</a></p>
</body></html>"""
    write_file_atomic(out / "report.html", page.encode())
    return out / "report.html"
