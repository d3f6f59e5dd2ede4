"""The report's near-flip section: samples both models withstand, ranked by how close the attacks came to
breaking the new model (its lowest true-class margin under attack), with the margin distribution.

A near-flip is one step from becoming a robustness negative flip: a slightly stronger attack, or the next
update, may break it. The threshold is the comparison's ``near_margin``, the metric ``near_flip`` of the summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rcat_ray.core.numbers import signed
from rcat_ray.report.comparison_data import Context, Flip, clean_images
from rcat_ray.report.comparison_plots import show_image

MARGINS_PNG = "near_flip_margins.png"
NEAR_GRID_PNG = "nearest_near_flips.png"


def _old_robust(flips: pa.Table) -> pa.Table:
    """Rows attacked for both models that the old model withstood, with a known lowest margin for the new one."""
    if "new_min_margin" not in flips.column_names:
        return flips.slice(0, 0)
    keep = pc.and_(
        pc.and_(pc.fill_null(flips.column("old_robust"), False), pc.is_valid(flips.column("new_robust"))),
        pc.is_valid(flips.column("new_min_margin")),
    )
    return flips.filter(keep)


def nearest_near_flips(flips: pa.Table, *, margin: float, top_k: int) -> tuple[list[Flip], int]:
    """The top_k near-flips, lowest new margin first (ties by sample id), and how many there are."""
    both = _old_robust(flips)
    both = both.filter(pc.fill_null(both.column("new_robust"), False))
    near = both.filter(pc.less(both.column("new_min_margin"), margin))
    total = near.num_rows
    rows = near.sort_by([("new_min_margin", "ascending"), ("sample_id", "ascending")]).slice(0, top_k).to_pylist()
    return [Flip.from_row(r, r["new_min_margin"]) for r in rows], total


def margin_histogram(flips: pa.Table, margin: float) -> Figure:
    """The new model's lowest margin under attack on the samples the old model withstood: broken ones (robust
    negative flips) below 0, withstood ones above, the near-flip threshold marked."""
    rows = _old_robust(flips)
    low = rows.column("new_min_margin").to_numpy(zero_copy_only=False).astype(np.float64)
    robust = rows.column("new_robust").to_numpy(zero_copy_only=False).astype(bool)
    fig = Figure(figsize=(7.5, 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = low[np.isfinite(low)]
    bins = np.linspace(min(finite.min(initial=0.0), -margin), max(finite.max(initial=0.0), 2 * margin), 60)
    ax.hist(low[~robust], bins=bins, color="#1f4e9c", label="new broken (robust negative flip)")
    ax.hist(low[robust], bins=bins, color="#7fb3d5", label="new withstood")
    ax.axvline(margin, color="#c0392b", linestyle="--", label=f"near-flip threshold {margin:g}")
    ax.axvline(0, color="#333333", linewidth=0.8)
    ax.set_xlabel("new model's lowest true-class margin under attack (logits)")
    ax.set_ylabel("samples")
    ax.set_title(f"Samples the old model withstood ({len(low)})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def near_grid(ctx: Context, chosen: list[Flip], *, per_row: int = 6) -> Figure:
    """The clean image of each near-flip with its lowest margin under attack: the attacks' closest point is not
    stored for a sample they did not break, so the clean image is what there is to show."""
    clean = clean_images(ctx.split, [f.sample_id for f in chosen]) if ctx.split is not None else {}
    rows = max(1, math.ceil(len(chosen) / per_row))
    fig = Figure(figsize=(per_row * 1.9, rows * 2.3 + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, per_row, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(chosen):
            ax.set_axis_off()
            continue
        f = chosen[i]
        caption = (
            f"#{f.sample_id} {ctx.class_name(f.label)}\nlowest {signed(f.score)}\n(clean {signed(f.new_clean_margin)})"
        )
        show_image(ax, clean.get(f.sample_id), caption)
    fig.suptitle("Nearest near-flips: clean image, the new model's lowest margin under attack", fontsize=10)
    return fig


def near_section(ctx: Context, stage_png: Callable[[str, Figure], None], *, top_k: int) -> dict[str, Any]:
    """What the template shows of near-flips; ``stage_png(name, figure)`` writes a figure beside the page."""
    margin = ctx.summary.get("near_margin")
    section: dict[str, Any] = {"margin": margin, "available": False, "total": 0, "rows": [], "image": None}
    section["image_note"] = ctx.image_note or "no image data"
    if margin is None or not _old_robust(ctx.flips).num_rows:
        return section
    section["available"] = True
    stage_png(MARGINS_PNG, margin_histogram(ctx.flips, float(margin)))
    section["histogram"] = MARGINS_PNG
    chosen, section["total"] = nearest_near_flips(ctx.flips, margin=float(margin), top_k=top_k)
    for rank, f in enumerate(chosen, 1):
        _, new_adv = ctx.preds_new.get(f.sample_id, (None, None))
        section["rows"].append(
            (
                rank,
                f.sample_id,
                ctx.class_label(f.label),
                ctx.class_name(new_adv),
                f"{signed(f.old_clean_margin)} / {signed(f.new_clean_margin)}",
                f"{f.score:.2f}" if math.isfinite(f.score) else "n/a",
            )
        )
    if chosen and ctx.split is not None:
        section["image"] = NEAR_GRID_PNG
        stage_png(NEAR_GRID_PNG, near_grid(ctx, chosen))
    return section
