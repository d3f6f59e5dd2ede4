"""What a sweep leaves in its output folder: the trial table, the Pareto plots and its page.

``trials.parquet`` (one row per trial: settings, choice metrics ``val_*`` with CIs and N, last per-epoch
metrics ``epoch_val_*``, Pareto flags, the chosen one), ``pareto.png`` (validation robust accuracy against
R-NFR and S-NFR, the front and the chosen trial marked, the rule's bar drawn) and ``report.html``
(``templates/sweep.html.j2``): which validation chose, the trials, and the paper-style tables rendered from
their records. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from rcat_ray.config import AttackConfig
from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.core.numbers import percent, percent_ci
from rcat_ray.report.paper_view import paper_table_view
from rcat_ray.report.render import render_page
from rcat_ray.sweep.choice import trial_label
from rcat_ray.sweep.config import SweepConfig

#: (metric, title) of the choice metrics, in the order tables show them.
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
    point with its CI where the validation has one; trials without choice metrics are left out."""
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
            ax.errorbar(
                x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="#c8ced6", elinewidth=1, zorder=1, label="95% CI"
            )
        ax.scatter(x, y, s=28, color="#9aa5b1", label="trials", zorder=2)
        front = shown[shown[front_col]].sort_values("val_rob_acc")
        ax.plot(
            100 * front["val_rob_acc"], 100 * front[metric], "-o", color="#1f77b4", ms=6, label="Pareto front", zorder=3
        )
        chosen = shown[shown["chosen"]]
        ax.scatter(
            100 * chosen["val_rob_acc"],
            100 * chosen[metric],
            marker="*",
            s=260,
            color="#d62728",
            edgecolor="black",
            label="chosen",
            zorder=4,
        )
        ax.axvline(100 * (new_rob_acc - tolerance), color="#555", ls="--", lw=1, label="new model - tolerance")
        for _, row in shown.iterrows():
            ax.annotate(
                trial_label(row),
                (100 * row["val_rob_acc"], 100 * row[metric]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
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


def _with_ci(row: Any, metric: str) -> str:
    """``value [low, high]`` in %, or the bare value where the validation has no CI ("" when undefined)."""
    return percent_ci(
        row.get(f"val_{metric}"), row.get(f"val_{metric}_ci_low"), row.get(f"val_{metric}_ci_high"), missing=""
    )


def _text(v: Any) -> str:
    return "" if v is None or pd.isna(v) else str(v)


def _trials_view(trials: pd.DataFrame) -> dict[str, Any]:
    """The trial table: settings, the choice metrics with CIs, N, the last per-epoch metrics."""
    names = ("trial_id", "kind", "alpha", "beta", "train_eps", "lr", "epochs", "epochs_run")
    settings = [c for c in names if c in trials.columns]
    epoch_cols = [(f"epoch_val_{m}", f"epoch {t}") for m, t in _METRICS if f"epoch_val_{m}" in trials.columns]
    n_col = "val_s_nfr_n" if "val_s_nfr_n" in trials.columns else None
    headers = [*settings, *(f"val {t}" for _, t in _METRICS), *(["N"] if n_col else []), *(t for _, t in epoch_cols)]
    rows, classes = [], []
    for _, row in trials.iterrows():
        cells = [_text(row[c]) for c in settings]
        cells += [_with_ci(row, m) for m, _ in _METRICS]
        if n_col:
            cells.append("" if pd.isna(row[n_col]) else str(int(row[n_col])))
        cells += [percent(row[c], missing="") for c, _ in epoch_cols]
        rows.append(cells)
        classes.append("chosen" if row["chosen"] else "")
    return {"headers": headers, "rows": rows, "row_classes": classes}


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

    chosen = outcome.chosen
    n_col = "val_s_nfr_n" if "val_s_nfr_n" in trials.columns else None
    new_rob = val.new["rob_acc"] if val is not None else {}
    validation_table = getattr(outcome, "validation_table", None)
    page = render_page(
        "sweep.html.j2",
        name=cfg.name,
        mode=cfg.mode,
        n_trials=len(trials),
        choice_validation=val is not None and val.source == "choice",
        what=what,
        epoch_validation=epoch_validation_text(cfg),
        new_rob_acc=outcome.new_val_rob_acc,
        new_ci=new_rob if new_rob.get("ci_low") is not None else None,
        tolerance=cfg.tolerance,
        chosen={
            "trial_id": chosen["trial_id"],
            "label": trial_label(chosen),
            "metrics": [f"{t} {_with_ci(chosen, m)}%" for m, t in _METRICS if _with_ci(chosen, m)],
            "n": int(chosen[n_col]) if n_col and pd.notna(chosen[n_col]) else None,
        },
        checkpoint=outcome.checkpoint,
        trials=_trials_view(trials),
        validation_table=None if validation_table is None else paper_table_view(validation_table),
        test_table=None if outcome.table is None else paper_table_view(outcome.table),
    )
    return write_file_atomic(out / "report.html", page)
