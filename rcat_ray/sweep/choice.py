"""Choosing a sweep's configuration, and the Pareto front of its trials.

The rule (explicit and documented, as the paper's "lowest S-NFR on validation", made safe): among the
trials whose validation robust accuracy is at least the new model's minus a tolerance, take the lowest
validation S-NFR; ties go to the higher robust accuracy, then to the lower trial id. A trial that buys a
low S-NFR by giving up robustness is therefore never chosen.

The rule is only as good as the validation it reads. By default a sweep feeds it the metrics of the
test-strength attack on a validation set large enough for confidence intervals (``val_*`` columns; see
:mod:`rcat_ray.sweep.judge`), not the cheap per-epoch validation that drives ASHA: a weak attack
rewards models that the test attack then breaks. A trial without choice metrics (stopped early by
ASHA, or failed) is never eligible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from rcat_ray.errors import ChoiceError


def choose_trial(
    trials: pd.DataFrame,
    *,
    new_rob_acc: float,
    tolerance: float,
    s_nfr: str = "val_s_nfr",
    rob_acc: str = "val_rob_acc",
    trial_id: str = "trial_id",
) -> pd.Series:
    """The row of ``trials`` the rule picks; raises ChoiceError when no trial is eligible."""
    ok = trials[(trials[rob_acc] >= new_rob_acc - tolerance) & trials[s_nfr].notna()]
    if ok.empty:
        best = trials[rob_acc].max() if len(trials) else float("nan")
        raise ChoiceError(
            f"no trial keeps validation robust accuracy >= {new_rob_acc:.4f} - {tolerance:.4f} "
            f"(best trial: {best:.4f}); relax the tolerance or widen the search"
        )
    ranked = ok.sort_values([s_nfr, rob_acc, trial_id], ascending=[True, False, True], kind="mergesort")
    return ranked.iloc[0]


@dataclass
class KindChoice:
    """The trial chosen for one loss kind, and whether it met the robustness bar of the rule."""

    kind: str
    row: pd.Series
    eligible: bool


def choose_per_kind(
    trials: pd.DataFrame,
    *,
    new_rob_acc: float,
    tolerance: float,
    kind: str = "kind",
    s_nfr: str = "val_s_nfr",
    rob_acc: str = "val_rob_acc",
    trial_id: str = "trial_id",
) -> dict[str, KindChoice]:
    """One choice per loss kind (the paper tunes each method's weights separately on validation).

    Each kind is judged by :func:`choose_trial` on its own trials. A kind none of whose trials keeps the
    new model's robust accuracy (PCT, which trains on clean inputs, typically) still needs weights to be
    reported at all: it falls back to the paper's plain rule, the lowest validation S-NFR, and is marked
    ``eligible=False`` so a report can say the bar was not met rather than hide it.
    """
    out: dict[str, KindChoice] = {}
    for name, group in trials[trials[s_nfr].notna()].groupby(kind, sort=False):
        try:
            row = choose_trial(
                group, new_rob_acc=new_rob_acc, tolerance=tolerance, s_nfr=s_nfr, rob_acc=rob_acc, trial_id=trial_id
            )
            out[str(name)] = KindChoice(str(name), row, True)
        except ChoiceError:
            ranked = group.sort_values([s_nfr, rob_acc, trial_id], ascending=[True, False, True], kind="mergesort")
            out[str(name)] = KindChoice(str(name), ranked.iloc[0], False)
    return out


def pareto_front(trials: pd.DataFrame, *, maximise: str, minimise: str) -> pd.Series:
    """Boolean mask of the non-dominated trials (higher ``maximise`` and lower ``minimise`` are better).

    A trial without both metrics (stopped early, failed, not judged) is not on the front: it has no
    point to plot, and NaN comparisons would otherwise count it as undominated.
    """
    x = trials[maximise].to_numpy(dtype=float)
    y = trials[minimise].to_numpy(dtype=float)
    front = []
    for i in range(len(trials)):
        if x[i] != x[i] or y[i] != y[i]:  # NaN
            front.append(False)
            continue
        dominated = ((x >= x[i]) & (y <= y[i]) & ((x > x[i]) | (y < y[i]))).any()
        front.append(not dominated)
    return pd.Series(front, index=trials.index)


def trial_label(row: Any) -> str:
    """A trial's loss and weights as the paper writes them: RCAT(0.5,0.4), PCT(1,2), AT."""
    kind = str(row.get("kind") or "").upper()
    if kind == "AT":
        return "AT"
    return f"{kind}({float(row.get('alpha')):g},{float(row.get('beta')):g})"
