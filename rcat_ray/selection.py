"""Choosing a sweep's configuration, and the Pareto front of its trials.

The rule (explicit and documented, as the paper's "lowest S-NFR on validation", made safe): among the
trials whose validation robust accuracy is at least the new model's minus a tolerance, take the lowest
validation S-NFR; ties go to the higher robust accuracy, then to the lower trial id. A trial that buys a
low S-NFR by giving up robustness is therefore never chosen.
"""

from __future__ import annotations

import pandas as pd


class SelectionError(ValueError):
    """No trial satisfies the rule."""


class SweepFailedError(RuntimeError):
    """Every trial failed: there is nothing to choose from (the CLI prints the first trial's error, exit 2)."""


def select_trial(
    trials: pd.DataFrame,
    *,
    new_rob_acc: float,
    tolerance: float,
    s_nfr: str = "val_s_nfr",
    rob_acc: str = "val_rob_acc",
    trial_id: str = "trial_id",
) -> pd.Series:
    """The row of ``trials`` the rule picks; raises SelectionError when no trial is eligible."""
    ok = trials[(trials[rob_acc] >= new_rob_acc - tolerance) & trials[s_nfr].notna()]
    if ok.empty:
        best = trials[rob_acc].max() if len(trials) else float("nan")
        raise SelectionError(
            f"no trial keeps validation robust accuracy >= {new_rob_acc:.4f} - {tolerance:.4f} "
            f"(best trial: {best:.4f}); relax the tolerance or widen the search"
        )
    ranked = ok.sort_values([s_nfr, rob_acc, trial_id], ascending=[True, False, True], kind="mergesort")
    return ranked.iloc[0]


def pareto_front(trials: pd.DataFrame, *, maximise: str, minimise: str) -> pd.Series:
    """Boolean mask of the non-dominated trials (higher ``maximise`` and lower ``minimise`` are better)."""
    x = trials[maximise].to_numpy()
    y = trials[minimise].to_numpy()
    front = []
    for i in range(len(trials)):
        dominated = ((x >= x[i]) & (y <= y[i]) & ((x > x[i]) | (y < y[i]))).any()
        front.append(not dominated)
    return pd.Series(front, index=trials.index)
