"""What a sweep leaves in its output folder: the trial table, the Pareto plots and an HTML section.

``trials.parquet`` (one row per trial: settings, the selection metrics ``val_*`` with their CIs and N, the
last per-epoch metrics ``epoch_val_*``, epochs run, checkpoints, Pareto flags, the chosen one),
``pareto.png`` (validation robust accuracy against R-NFR and against S-NFR with their CIs, the front
highlighted, the chosen trial marked, the eligibility bar of the selection rule drawn) and ``report.html``,
which says which validation chose (attack, N) and shows the cheap per-epoch numbers beside the ones the
rule read, so a reader sees how far they disagree. Every file is written under a temporary name and renamed.
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

from rcat_ray.config import AttackConfig
from rcat_ray.store.result_store import write_file_atomic
from rcat_ray.sweep.choice import trial_label
from rcat_ray.sweep.config import SweepConfig

#: (metric, title) of the selection metrics, in the order tables show them.
_METRICS = (("acc", "Acc"), ("rob_acc", "RobAcc"), ("nfr", "NFR"), ("r_nfr", "R-NFR"), ("s_nfr", "S-NFR"))


def _err(trials: Any, metric: str) -> Any:
    """Asymmetric error bars (in %) from the CI columns, or None when the validation has no CIs."""
    lo, hi = f"val_{metric}_ci_low", f"val_{metric}_ci_high"
    if lo not in trials or hi not in trials or trials[lo].isna().all():
        return None
    v = trials[f"val_{metric}"]
    return [100 * (v - trials[lo]).clip(lower=0).fillna(0), 100 * (trials[hi] - v).clip(lower=0).fillna(0)]


def pareto_plot(trials: Any, new_rob_acc: float, tolerance: float, what: str = "") -> bytes:
    """Two panels, robust accuracy (x, higher is better) against R-NFR and S-NFR (y, lower is better), each
    point with its CI where the validation has one; trials without selection metrics are left out."""
    fig = Figure(figsize=(10, 4.6), dpi=110)
    for ax, (metric, label, front_col) in zip(
        fig.subplots(1, 2),
        (("val_r_nfr", "R-NFR", "pareto_r_nfr"), ("val_s_nfr", "S-NFR", "pareto_s_nfr")),
        strict=True,
    ):
        shown = trials[trials["val_rob_acc"].notna() & trials[metric].notna()]
        x, y = 100 * shown["val_rob_acc"], 100 * shown[metric]
        xerr, yerr = _err(shown, "rob_acc"), _err(shown, metric.removeprefix("val_"))
        if xerr is not None or yerr is not None:
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="#c8ced6", elinewidth=1, zorder=1,
                        label="95% CI")  # fmt: skip
        ax.scatter(x, y, s=28, color="#9aa5b1", label="trials", zorder=2)
        front = shown[shown[front_col]].sort_values("val_rob_acc")
        ax.plot(100 * front["val_rob_acc"], 100 * front[metric], "-o", color="#1f77b4", ms=6, label="Pareto front",
                zorder=3)  # fmt: skip
        chosen = shown[shown["chosen"]]
        ax.scatter(100 * chosen["val_rob_acc"], 100 * chosen[metric], marker="*", s=260, color="#d62728",
                   edgecolor="black", label="chosen", zorder=4)  # fmt: skip
        ax.axvline(100 * (new_rob_acc - tolerance), color="#555", ls="--", lw=1, label="new model - tolerance")
        for _, row in shown.iterrows():
            ax.annotate(trial_label(row), (100 * row["val_rob_acc"], 100 * row[metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("validation robust accuracy (%)")
        ax.set_ylabel(f"validation {label} (%)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8, loc="best")
    if what:
        fig.suptitle(what, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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


def _pct(v: Any) -> str:
    return "" if v is None or pd.isna(v) else f"{100 * float(v):.2f}"


def _with_ci(row: Any, metric: str) -> str:
    """``value [low, high]`` in %, or the bare value where the validation has no CI."""
    text = _pct(row.get(f"val_{metric}"))
    lo, hi = row.get(f"val_{metric}_ci_low"), row.get(f"val_{metric}_ci_high")
    if text and lo is not None and hi is not None and pd.notna(lo) and pd.notna(hi):
        text += f" [{_pct(lo)}, {_pct(hi)}]"
    return text


def epoch_validation_text(cfg: SweepConfig) -> str:
    """The cheap per-epoch validation in words (what drove ASHA and the progress lines)."""
    v = cfg.base.validation
    a = v.attack or AttackConfig(eps=cfg.base.train_attack.eps, attacks=("apgd-ce",), n_iter=10)
    return f"{' + '.join(x.upper() for x in a.cascade)}, {a.n_iter} iterations, eps {a.eps:g}, on {v.samples} samples"


def write_sweep_outputs(cfg: SweepConfig, outcome: Any) -> Path:
    """Write trials.parquet, pareto.png and report.html into the sweep's output folder."""
    out = outcome.out
    trials = outcome.trials
    val = outcome.validation
    what = val.describe() if val is not None else ""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(trials, preserve_index=False), buf)
    write_file_atomic(out / "trials.parquet", buf.getvalue())
    write_file_atomic(out / "pareto.png", pareto_plot(trials, outcome.new_val_rob_acc, cfg.tolerance, what))

    settings = [c for c in ("trial_id", "kind", "alpha", "beta", "train_eps", "lr", "epochs", "epochs_run")
                if c in trials.columns]  # fmt: skip
    epoch_cols = [(f"epoch_val_{m}", f"epoch {t}") for m, t in _METRICS if f"epoch_val_{m}" in trials.columns]
    n_col = "val_s_nfr_n" if "val_s_nfr_n" in trials.columns else None
    head = "".join(
        f"<th>{html.escape(c)}</th>"
        for c in [*settings, *(f"val {t}" for _, t in _METRICS), *(["N"] if n_col else []), *(t for _, t in epoch_cols)]
    )
    body = []
    for _, row in trials.iterrows():
        cells = [("" if row[c] is None or pd.isna(row[c]) else str(row[c])) for c in settings]
        cells += [_with_ci(row, m) for m, _ in _METRICS]
        if n_col:
            cells.append("" if pd.isna(row[n_col]) else str(int(row[n_col])))
        cells += [_pct(row[c]) for c, _ in epoch_cols]
        cls = ' class="chosen"' if row["chosen"] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(t)}</td>" for t in cells) + "</tr>")
    chosen = outcome.chosen
    if val is not None and val.source == "selection":
        which = (
            f"<p><b>Validation that chose.</b> {html.escape(what)}, through the flip engine (values with 95% "
            f"bootstrap CIs). The per-epoch validation ({html.escape(epoch_validation_text(cfg))}) only drove "
            "ASHA and the progress lines; its last-epoch values are the <i>epoch</i> columns. Trials stopped "
            "early or failed were not judged and cannot be chosen.</p>"
        )
    else:
        which = (
            f"<p><b>Validation that chose.</b> {html.escape(what or epoch_validation_text(cfg))}: "
            "<code>selection.enabled</code> is false, so the rule read the cheap per-epoch validation (no CIs).</p>"
        )
    new_ci = ""
    if val is not None and val.new["rob_acc"].get("ci_low") is not None:
        new_ci = f" [{_pct(val.new['rob_acc']['ci_low'])}, {_pct(val.new['rob_acc']['ci_high'])}]"
    val_html = ""
    if getattr(outcome, "validation_table", None) is not None:
        from rcat_ray.evaluate.paper_table import to_markdown

        val_html = (
            "<h3>Judged trials on the selection validation (paired differences: the chosen trial minus each)</h3>"
            + _md_table_to_html(to_markdown([outcome.validation_table]))
        )
    test_html = ""
    if outcome.table is not None:
        from rcat_ray.evaluate.paper_table import to_markdown

        test_html = f"<h3>Chosen model on the test settings</h3>{_md_table_to_html(to_markdown([outcome.table]))}"
    chosen_metrics = ", ".join(f"{t} {_with_ci(chosen, m)}%" for m, t in _METRICS if _with_ci(chosen, m))
    n_text = f" (N = {int(chosen[n_col])})" if n_col and pd.notna(chosen[n_col]) else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Sweep {html.escape(cfg.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} tr.chosen{{background:#fde2e2;font-weight:bold}}
</style></head><body>
<h2>Sweep {html.escape(cfg.name)} ({html.escape(cfg.mode)}, {len(trials)} trials)</h2>
{which}
<p><b>Selection rule.</b> Among the trials whose validation robust accuracy is at least the new model's
({100 * outcome.new_val_rob_acc:.2f}%{new_ci}) minus the tolerance ({100 * cfg.tolerance:.2f} points), the lowest
validation S-NFR; ties go to the higher robust accuracy, then to the lower trial id.</p>
<p><b>Chosen:</b> trial {html.escape(str(chosen["trial_id"]))}, {html.escape(trial_label(chosen))}: validation
{html.escape(chosen_metrics)}{n_text};
checkpoint <code>{html.escape(str(outcome.checkpoint))}</code>, config <code>best.yaml</code>.</p>
<img src="pareto.png" alt="Pareto fronts" style="max-width:100%">
<h3>Trials (validation metrics in %; <i>val</i>: what the rule read, <i>epoch</i>: last per-epoch validation)</h3>
<table><tr>{head}</tr>{"".join(body)}</table>
{val_html}
{test_html}
</body></html>"""
    report = out / "report.html"
    write_file_atomic(report, page.encode())
    return report
