"""A flip summary as a fixed-width text table for a terminal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rcat_ray.core.flips.metrics import METRIC_LABELS, METRICS
from rcat_ray.core.numbers import percent


def _pct(value: float | None, width: int = 7) -> str:
    """A rate in percent ('-' when undefined), right-aligned so columns line up."""
    return percent(value).rjust(width)


def format_summary(summary: Mapping[str, Any], *, per_class: bool = True) -> str:
    """Render a :func:`summarize` result as a fixed-width text table for a terminal.

    Rates are shown in percent with their confidence interval and their own N, because a reader must
    see that clean and robust numbers may rest on different sample counts. The per-class table shows
    values only (no intervals) to stay readable at 80-100 columns.
    """
    confidence = summary.get("bootstrap", {}).get("confidence", 0.95)
    ci_header = f"{round(100 * confidence, 2):g}% CI"
    width = max(14, *(len(label) + 2 for label in METRIC_LABELS.values()))
    lines = [f"{'metric':<{width}}{'value %':>9}  {ci_header:^19}{'N':>9}"]
    lines.append("-" * len(lines[0]))
    for key in METRICS:
        entry = summary["metrics"].get(key)
        if entry is None:
            continue
        if entry["ci_low"] is None or entry["ci_high"] is None:
            ci = f"{'-':^19}"
        else:
            ci = f"[{_pct(entry['ci_low'], 6)}, {_pct(entry['ci_high'], 6)}]"
            ci = f"{ci:^19}"
        lines.append(f"{METRIC_LABELS[key]:<{width}}{_pct(entry['value'], 9)}  {ci}{entry['n']:>9}")

    noise = summary.get("attack_noise")
    if noise:
        seeds = ", ".join(str(x) for x in noise["seeds"])
        lines += ["", f"attack noise over seeds {seeds} (each seed alone; samples whose flag changes between seeds)"]
        for key, entry in noise["metrics"].items():
            values = " / ".join(percent(v).strip() for v in entry["per_seed"])
            lines.append(
                f"{METRIC_LABELS[key]:<{width}}{values:>24}  unstable {entry['unstable']} of {entry['n']}"
                f" ({percent(entry['unstable_rate']).strip()}%)"
            )

    classes = summary.get("per_class") or []
    if per_class and classes:
        shown = ("acc", "nfr", "pfr", "rob_acc", "r_nfr", "r_pfr", "s_nfr")
        name_width = max(5, *(len(str(c["name"])) for c in classes)) + 1
        header = f"{'class':<{name_width}}{'N':>7}{'N rob':>7}" + "".join(f"{METRIC_LABELS[key]:>8}" for key in shown)
        lines += ["", "per class (values in %)", header, "-" * len(header)]
        for c in classes:
            values = "".join(_pct(c["metrics"][key]["value"], 8) for key in shown)
            lines.append(f"{c['name']!s:<{name_width}}{c['n_clean']:>7}{c['n_robust']:>7}{values}")
    return "\n".join(lines)
