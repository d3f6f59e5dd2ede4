"""The HTML report of one stored comparison: header, summary table, per-class flips, worst flipped samples.

Every rate is shown with its confidence interval and its own N, and the worst flips with the adversarial
images of both models. Built only from what the result store holds, so it can be regenerated anywhere.
Files are staged under temporary names and renamed, ``report.html`` last, so a reader never sees a
half-written report or one pointing at a missing plot. Data: :mod:`.comparison_data`; figures:
:mod:`.comparison_plots`; page: ``templates/comparison.html.j2``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from rcat_ray.core.atomic import temporary_name
from rcat_ray.core.attack_checks import describe_flags
from rcat_ray.core.flips import METRICS
from rcat_ray.core.numbers import finite, signed
from rcat_ray.report.comparison_data import Context, load_context, point_status, worst_flips
from rcat_ray.report.comparison_plots import flip_grid, metric_label, per_class_figure
from rcat_ray.report.near_flips import MARGINS_PNG, NEAR_GRID_PNG, near_section
from rcat_ray.report.render import render_page
from rcat_ray.store.result_store import ResultStore, now_iso

__all__ = ["CLEAN_GRID_PNG", "PER_CLASS_PNG", "REPORT_NAME", "ROBUST_GRID_PNG", "write_report"]

#: File name of the report inside ``out_dir``.
REPORT_NAME = "report.html"
PER_CLASS_PNG = "per_class_flips.png"
ROBUST_GRID_PNG = "worst_robust_flips.png"
CLEAN_GRID_PNG = "worst_clean_flips.png"
#: Every file name this module may write; a new report removes those it did not produce this time.
_ARTIFACTS = (PER_CLASS_PNG, ROBUST_GRID_PNG, CLEAN_GRID_PNG, MARGINS_PNG, NEAR_GRID_PNG)

#: One-line definitions shown next to each metric, so the table can be read without the paper.
_DEFINITIONS: Mapping[str, str] = {
    "acc_old": "clean accuracy of the old model",
    "acc": "clean accuracy of the new model",
    "nfr": "old correct, new wrong (clean)",
    "pfr": "old wrong, new correct (clean)",
    "relative_nfr": "NFR / ((1 - err_old) * err_new)",
    "rob_acc_old": "robust accuracy of the old model",
    "rob_acc": "robust accuracy of the new model",
    "r_nfr": "old robust, new not",
    "r_pfr": "old not robust, new robust",
    "b_nfr": "both a clean and a robust negative flip",
    "s_nfr": "a clean or a robust negative flip (NFR + R-NFR - B-NFR)",
    "near_flip": "both robust, but the attacks brought the new model's margin below the near-flip threshold",
}


def write_report(store: ResultStore, comparison_key: str, out_dir: str | Path, *, top_k: int = 8) -> Path:
    """Write ``<out_dir>/report.html`` plus PNG plots next to it; returns the HTML path.

    Reports are often served from a shared folder while a nightly job rewrites them: plots are renamed into
    place first and the HTML last, and a failure part-way leaves the previous report and no temporary files.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ctx = load_context(store, comparison_key)

    writer = _AtomicWriter(out)
    try:
        page = {
            **_header(ctx),
            "summary": _summary(ctx),
            "per_class": _per_class(ctx, writer),
            "worst": [_worst_section(ctx, writer, robust=robust, top_k=top_k) for robust in (True, False)],
            "near": near_section(ctx, writer.stage_png, top_k=top_k),
            "confirmed": [_confirmed(ctx, record) for record in ctx.confirmed],
        }
        writer.stage_text(REPORT_NAME, _page(ctx, page))
        writer.commit(last=REPORT_NAME)
    finally:
        writer.discard()
    for stale in set(_ARTIFACTS) - writer.committed:
        (out / stale).unlink(missing_ok=True)
    return out / REPORT_NAME


def _page(ctx: Context, page: Mapping[str, Any]) -> str:
    return render_page("comparison.html.j2", key=ctx.key, confidence=ctx.confidence_label, **page)


def _model(info: Mapping[str, Any] | None, fallback: Mapping[str, Any] | None) -> dict[str, str]:
    info = info or fallback or {}
    return {"name": str(info.get("name", "?")), "fingerprint": str(info.get("fingerprint", "?"))}


def _header(ctx: Context) -> dict[str, Any]:
    s, m = ctx.summary, ctx.manifest
    data = m.get("data") or {}
    dataset = f"{data.get('dataset', '?')} / {data.get('split', '?')}"
    if data.get("n_samples") is not None:
        dataset += f" ({data['n_samples']} samples, ids {data.get('sample_id_min')}..{data.get('sample_id_max')})"
    tm = s.get("threat_model") or {}
    eps = finite(tm.get("eps"))
    eps_text = "?" if eps is None else f"{eps:g}" + (f" (= {eps * 255:.3g}/255)" if tm.get("norm") == "Linf" else "")
    boot = s.get("bootstrap") or {}
    return {
        "old": _model(s.get("old"), m.get("old_model")),
        "new": _model(s.get("new"), m.get("new_model")),
        "dataset": dataset,
        "norm": tm.get("norm", "?"),
        "eps": eps_text,
        "attacks": " → ".join(str(a) for a in s.get("attacks") or []) or "?",
        "n_clean": s.get("n_clean", "?"),
        "n_robust": s.get("n_robust", "?"),
        "bootstrap": f"{boot.get('n_resamples', '?')} paired resamples, seed {boot.get('seed', '?')}",
        "created": m.get("created_at", "?"),
        "written": now_iso(),
        "sanity": [
            {
                "side": side,
                "text": describe_flags(ctx.sanity.get(side), prefix=False),
                "flagged": bool((ctx.sanity.get(side) or {}).get("flags")),
            }
            for side in ("old", "new")
        ],
    }


def _metric(m: Mapping[str, Any] | None) -> dict[str, Any]:
    m = m or {}
    return {"value": m.get("value"), "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"), "n": m.get("n", "?")}


def _summary(ctx: Context) -> list[dict[str, Any]]:
    """Known metrics in display order, then any newer ones the summary carries."""
    metrics = ctx.summary.get("metrics") or {}
    keys = [k for k in METRICS if k in metrics] + sorted(k for k in metrics if k not in METRICS)
    return [{"label": metric_label(k), "definition": _DEFINITIONS.get(k, ""), **_metric(metrics[k])} for k in keys]


def _confirmed(ctx: Context, record: Mapping[str, Any]) -> dict[str, Any]:
    """R-NFR and R-PFR beside their confirmed values under one stronger attack, with the dissolved flips."""
    attack = record.get("attack") or {}
    plain = ctx.summary.get("metrics") or {}
    rows = []
    for key in ("r_nfr", "r_pfr"):
        rows.append(
            {
                "label": metric_label(key),
                "plain": _metric(plain.get(key)),
                "confirmed": _metric(record.get(f"{key}_confirmed")),
                "flips": record.get(f"{key}_flips"),
                "dissolved": record.get(f"{key}_dissolved"),
            }
        )
    cascade = attack.get("attacks") or []
    return {
        "attack": f"{' → '.join(cascade)}, {attack.get('n_iter')} iterations, {attack.get('n_restarts')} restart(s)",
        "rows": rows,
    }


def _per_class(ctx: Context, writer: _AtomicWriter) -> dict[str, Any] | None:
    per_class = ctx.summary.get("per_class") or []
    if not per_class:
        return None
    writer.stage_png(PER_CLASS_PNG, per_class_figure(ctx, per_class))
    keys = ("acc", "nfr", "pfr", "rob_acc", "r_nfr", "r_pfr", "s_nfr")
    rows = [
        {
            "label": ctx.class_label(row.get("class")),
            "n_clean": row.get("n_clean", "?"),
            "n_robust": row.get("n_robust", "?"),
            "metrics": [_metric((row.get("metrics") or {}).get(k)) for k in keys],
        }
        for row in per_class
    ]
    return {"image": PER_CLASS_PNG, "metrics": [metric_label(k) for k in keys], "rows": rows}


def _worst_section(ctx: Context, writer: _AtomicWriter, *, robust: bool, top_k: int) -> dict[str, Any]:
    kind = "robust" if robust else "clean"
    section: dict[str, Any] = {
        "kind": kind,
        "title": "Worst robust negative flips (old robust, new not)"
        if robust
        else "Worst clean negative flips (old correct, new wrong)",
        "rank_by": "old adv margin − new adv margin" if robust else "old clean margin − new clean margin",
        "unavailable": robust and not ctx.summary.get("n_robust"),
        "total": 0,
        "rows": [],
        "image": None,
        "image_note": ctx.image_note or "no image data",
    }
    if section["unavailable"]:
        return section
    chosen, section["total"] = worst_flips(ctx.flips, robust=robust, top_k=top_k)
    if not section["total"]:
        return section
    for rank, f in enumerate(chosen, 1):
        oc, oa = ctx.preds_old.get(f.sample_id, (None, None))
        nc, na = ctx.preds_new.get(f.sample_id, (None, None))
        section["rows"].append(
            (
                rank,
                f.sample_id,
                ctx.class_label(f.label),
                ctx.class_name(oc),
                ctx.class_name(nc),
                _adv_pred_text(ctx, oa, f.old_clean_correct, f.old_robust),
                _adv_pred_text(ctx, na, f.new_clean_correct, f.new_robust),
                f"{signed(f.old_clean_margin)} / {signed(f.new_clean_margin)}",
                f"{signed(f.old_adv_margin)} / {signed(f.new_adv_margin)}",
                f"{f.score:.2f}" if math.isfinite(f.score) else "n/a",
            )
        )
    if ctx.split is not None:
        section["image"] = ROBUST_GRID_PNG if robust else CLEAN_GRID_PNG
        writer.stage_png(section["image"], flip_grid(ctx, chosen, robust=robust))
    return section


def _adv_pred_text(ctx: Context, pred: int | None, clean_correct: bool, robust: bool | None) -> str:
    status = point_status(clean_correct, robust)
    if status in ("not attacked", "wrong on clean, not attacked"):
        return status
    return f"{ctx.class_name(pred)} ({status})"


class _AtomicWriter:
    """Stage several files under core/atomic's temporary names, then rename them into place in a fixed order.

    Renaming within one folder is atomic on POSIX and Windows (``os.replace``), so readers see either the
    old file or the new one. Temporary files live in the same folder so the rename never crosses devices.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.staged: dict[str, Path] = {}
        self.committed: set[str] = set()

    def _tmp(self, name: str) -> Path:
        return Path(temporary_name((self.folder / name).as_posix()))  # the one naming rule (core/atomic.py)

    def stage_text(self, name: str, text: str) -> None:
        tmp = self._tmp(name)
        self.staged[name] = tmp
        tmp.write_text(text, encoding="utf-8")

    def stage_png(self, name: str, fig: Figure) -> None:
        tmp = self._tmp(name)
        self.staged[name] = tmp
        fig.savefig(tmp, format="png")

    def commit(self, *, last: str) -> None:
        for name in sorted(self.staged, key=lambda n: n == last):
            os.replace(self.staged[name], self.folder / name)
            self.committed.add(name)
        self.staged.clear()

    def discard(self) -> None:
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged.clear()
