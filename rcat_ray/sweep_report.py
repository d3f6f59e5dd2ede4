"""What a sweep leaves in its output folder: the trial table, the Pareto plots and an HTML section.

``trials.parquet`` (one row per trial: settings, last validation metrics, epochs run, checkpoint, Pareto
flags, the chosen one), ``pareto.png`` (validation robust accuracy against R-NFR and against S-NFR, the
front highlighted, the chosen trial marked, the eligibility bar of the selection rule drawn) and
``report.html``. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from rcat_ray.config import SweepConfig
from rcat_ray.store import write_file_atomic


def pareto_plot(trials: Any, new_rob_acc: float, tolerance: float) -> bytes:
    """Two panels, robust accuracy (x, higher is better) against R-NFR and S-NFR (y, lower is better)."""
    fig = Figure(figsize=(10, 4.2), dpi=110)
    for ax, (metric, label, front_col) in zip(
        fig.subplots(1, 2),
        (("val_r_nfr", "R-NFR", "pareto_r_nfr"), ("val_s_nfr", "S-NFR", "pareto_s_nfr")),
        strict=True,
    ):
        x, y = 100 * trials["val_rob_acc"], 100 * trials[metric]
        ax.scatter(x, y, s=28, color="#9aa5b1", label="trials", zorder=2)
        front = trials[trials[front_col]].sort_values("val_rob_acc")
        ax.plot(100 * front["val_rob_acc"], 100 * front[metric], "-o", color="#1f77b4", ms=6, label="Pareto front",
                zorder=3)  # fmt: skip
        chosen = trials[trials["chosen"]]
        ax.scatter(100 * chosen["val_rob_acc"], 100 * chosen[metric], marker="*", s=260, color="#d62728",
                   edgecolor="black", label="chosen", zorder=4)  # fmt: skip
        ax.axvline(100 * (new_rob_acc - tolerance), color="#555", ls="--", lw=1, label="new model - tolerance")
        for _, row in trials.iterrows():
            ax.annotate(_trial_label(row), (100 * row["val_rob_acc"], 100 * row[metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("validation robust accuracy (%)")
        ax.set_ylabel(f"validation {label} (%)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _trial_label(row: Any) -> str:
    kind = str(row.get("kind") or "").upper()
    if kind == "AT":
        return "AT"
    return f"{kind}({row.get('alpha'):g},{row.get('beta'):g})"


def _md_table_to_html(md: str) -> str:
    """The pipe tables of the paper-table Markdown as HTML tables (other lines as paragraphs)."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            rows.clear()  # fmt: skip

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                rows.append([c.replace("**", "") if c.startswith("**") else c for c in cells])
        else:
            flush()
            if line.strip():
                out.append(f"<p>{html.escape(line.lstrip('# '))}</p>")
    flush()
    return "\n".join(out)


def write_sweep_outputs(cfg: SweepConfig, outcome: Any) -> Path:
    """Write trials.parquet, pareto.png and report.html into the sweep's output folder."""
    out = outcome.out
    trials = outcome.trials
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(trials, preserve_index=False), buf)
    write_file_atomic(out / "trials.parquet", buf.getvalue())
    write_file_atomic(out / "pareto.png", pareto_plot(trials, outcome.new_val_rob_acc, cfg.tolerance))

    columns = ("trial_id", "kind", "alpha", "beta", "train_eps", "lr", "epochs", "epochs_run",
               "val_acc", "val_rob_acc", "val_nfr", "val_r_nfr", "val_s_nfr")  # fmt: skip
    shown = [c for c in columns if c in trials.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = []
    for _, row in trials.iterrows():
        cells = []
        for c in shown:
            v = row[c]
            if v is None or pd.isna(v):
                text = ""
            else:
                text = f"{100 * v:.2f}" if c.startswith("val_") else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        cls = ' class="chosen"' if row["chosen"] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    chosen = outcome.chosen
    test_html = ""
    if outcome.table is not None:
        from rcat_ray.paper_table import to_markdown

        test_html = f"<h3>Chosen model on the test settings</h3>{_md_table_to_html(to_markdown([outcome.table]))}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Sweep {html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} tr.chosen{{background:#fde2e2;font-weight:bold}}
</style></head><body>
<h2>Sweep {html.escape(cfg.name)} ({html.escape(cfg.mode)}, {len(trials)} trials)</h2>
<p><b>Selection rule.</b> Among the trials whose validation robust accuracy is at least the new model's
({100 * outcome.new_val_rob_acc:.2f}%) minus the tolerance ({100 * cfg.tolerance:.2f} points), the lowest validation
S-NFR; ties go to the higher robust accuracy, then to the lower trial id.</p>
<p><b>Chosen:</b> trial {html.escape(str(chosen["trial_id"]))}, {html.escape(_trial_label(chosen))},
validation S-NFR {100 * chosen["val_s_nfr"]:.2f}%, robust accuracy {100 * chosen["val_rob_acc"]:.2f}%;
checkpoint <code>{html.escape(str(outcome.checkpoint))}</code>, config <code>best.yaml</code>.</p>
<img src="pareto.png" alt="Pareto fronts" style="max-width:100%">
<h3>Trials (validation metrics in %, last reported epoch)</h3>
<table><tr>{head}</tr>{"".join(body)}</table>
{test_html}
</body></html>"""
    report = out / "report.html"
    write_file_atomic(report, page.encode())
    return report
