"""The comparison report's figures, drawn on matplotlib's Agg canvas (no pyplot: no global backend, no GUI,
safe from a worker thread): flip rates per class, and one row of panels per worst flipped sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rcat_ray.core.flips import METRIC_LABELS
from rcat_ray.core.numbers import finite, signed
from rcat_ray.report.comparison_data import Context, Flip, adversarial_images, clean_images, point_status

__all__ = ["flip_grid", "metric_label", "per_class_figure", "show_image"]


def metric_label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


# Colours of the per-class plot: negative flips saturated, positive flips a lighter tint of the same hue.
_BAR_STYLE: tuple[tuple[str, str, float], ...] = (
    ("nfr", "#c0392b", 1.0),
    ("r_nfr", "#1f4e9c", 1.0),
    ("pfr", "#c0392b", 0.35),
    ("r_pfr", "#1f4e9c", 0.35),
)


def per_class_figure(ctx: Context, per_class: Sequence[Mapping[str, Any]]) -> Figure:
    """Grouped bars per class: NFR and R-NFR saturated, PFR and R-PFR lighter, with CI error bars."""
    n = len(per_class)
    names = [ctx.class_name(row.get("class")) for row in per_class]
    fig = Figure(figsize=(max(6.0, 0.9 * n + 2.0), 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(_BAR_STYLE)
    x = np.arange(n)
    for j, (key, colour, alpha) in enumerate(_BAR_STYLE):
        vals, lo_err, hi_err = [], [], []
        for row in per_class:
            m = (row.get("metrics") or {}).get(key) or {}
            v, lo, hi = finite(m.get("value")), finite(m.get("ci_low")), finite(m.get("ci_high"))
            vals.append(np.nan if v is None else v * 100)
            lo_err.append(0.0 if v is None or lo is None else max(0.0, (v - lo) * 100))
            hi_err.append(0.0 if v is None or hi is None else max(0.0, (hi - v) * 100))
        ax.bar(
            x + (j - (len(_BAR_STYLE) - 1) / 2) * width,
            vals,
            width,
            color=colour,
            alpha=alpha,
            label=metric_label(key),
            yerr=[lo_err, hi_err],
            capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "#333333", "alpha": 0.8},
        )
    ax.set_xticks(x)
    long_names = max((len(s) for s in names), default=0) > 4
    ax.set_xticklabels(names, rotation=30 if long_names else 0, ha="right" if long_names else "center")
    ax.set_ylabel("rate (% of the class's samples)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Flip rates per class ({ctx.confidence_label} error bars)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(ncols=4, fontsize=8, loc="upper left")
    return fig


def flip_grid(ctx: Context, chosen: Sequence[Flip], *, robust: bool) -> Figure:
    """One row per flipped sample: clean, old adversarial, new adversarial, amplified |new adv - clean|."""
    assert ctx.split is not None
    ids = [f.sample_id for f in chosen]
    old_key, new_key = ctx.manifest.get("old_table"), ctx.manifest.get("new_table")
    adv_old = adversarial_images(ctx, old_key, ids)
    adv_new = adversarial_images(ctx, new_key, ids)

    tm = ctx.summary.get("threat_model") or {}
    eps = finite(tm.get("eps"))
    clean_imgs = clean_images(ctx.split, ids)
    deltas: dict[int, np.ndarray] = {}
    for f in chosen:
        if f.sample_id in clean_imgs and f.sample_id in adv_new:
            deltas[f.sample_id] = np.abs(adv_new[f.sample_id] - clean_imgs[f.sample_id])
    # Linf: full brightness is the budget eps, so panels compare across samples; L2 spreads the budget
    # thinly over pixels, so scale to the largest shown change instead.
    if tm.get("norm") == "Linf" and eps:
        gain = 1.0 / eps
    else:
        peak = max((float(d.max()) for d in deltas.values()), default=0.0)
        gain = 1.0 / peak if peak > 0 else 1.0

    cols = 4
    fig = Figure(figsize=(cols * 2.3, max(1, len(chosen)) * 2.55 + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(chosen)), cols, squeeze=False)
    for row, f in enumerate(chosen):
        oc, oa = ctx.preds_old.get(f.sample_id, (None, None))
        nc, na = ctx.preds_new.get(f.sample_id, (None, None))
        clean = clean_imgs.get(f.sample_id)
        old_status = point_status(f.old_clean_correct, f.old_robust)
        new_status = point_status(f.new_clean_correct, f.new_robust)
        panels = [
            (
                clean,
                f"#{f.sample_id}  label {ctx.class_name(f.label)}\n"
                f"clean: old→{ctx.class_name(oc)} ({signed(f.old_clean_margin)})\n"
                f"new→{ctx.class_name(nc)} ({signed(f.new_clean_margin)})",
            ),
            (
                _stored_point(adv_old.get(f.sample_id), clean, old_status),
                _adv_caption("old", ctx, oa, old_status, f.old_adv_margin),
            ),
            (
                _stored_point(adv_new.get(f.sample_id), clean, new_status),
                _adv_caption("new", ctx, na, new_status, f.new_adv_margin),
            ),
            (
                None if f.sample_id not in deltas else np.clip(deltas[f.sample_id] * gain, 0.0, 1.0),
                f"|new adv − clean| ×{gain:.3g}\n" + _delta_caption(deltas.get(f.sample_id), new_status),
            ),
        ]
        for col, (img, caption) in enumerate(panels):
            show_image(axes[row][col], img, caption)
    kind = "Robust" if robust else "Clean"
    fig.suptitle(f"{kind} negative flips: clean | old adversarial | new adversarial | perturbation", fontsize=10)
    return fig


def _delta_caption(delta: np.ndarray | None, new_status: str) -> str:
    """Say why a perturbation panel is empty, so a black square is not read as a failed attack."""
    if delta is None:
        return "not available"
    if new_status != "broken":
        return f"none (new model:\n{new_status})"
    return f"max {float(delta.max()):.3g}"


def _stored_point(adv: np.ndarray | None, clean: np.ndarray | None, status: str) -> np.ndarray | None:
    """The image the model was judged on: its adversarial example, or the clean image it kept."""
    if adv is not None:
        return adv
    if status in ("withstood", "wrong on clean, not attacked"):
        return clean
    return None


def _adv_caption(which: str, ctx: Context, pred: int | None, status: str, margin: float | None) -> str:
    if status == "not attacked":
        return f"{which} model: not attacked"
    if status == "wrong on clean, not attacked":
        return f"{which} model: wrong on clean\n(clean image, not attacked)"
    return f"{which} adv: {status}\n→{ctx.class_name(pred)} (margin {signed(margin)})"


def show_image(ax: Any, img: np.ndarray | None, caption: str) -> None:
    """Grey images (C=1) with a grey colour map, RGB as RGB, on a fixed [0, 1] range so panels compare."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption, fontsize=7, loc="left")
    if img is None:
        ax.text(0.5, 0.5, "image not stored", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_facecolor("#eeeeee")
        return
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3:
        ax.imshow(np.clip(arr.transpose(1, 2, 0), 0.0, 1.0), interpolation="nearest")
    else:
        grey = arr[0] if arr.ndim == 3 else arr
        ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
