"""The trials of a sweep: the paper's grids exactly, or random samples with RCAT's weights on the simplex.

Trials are plain dicts of overrides of a fine-tuning config (``loss``, and optionally ``train_eps``, ``lr``,
``epochs``). Generating them here, from a seeded RNG, makes a sweep reproducible and lets the tests check
the space without Ray.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

#: docs/contracts.md §1.4: RCAT (alpha, beta) pairs, and PCT/PCAT beta values with alpha = 1.
PAPER_RCAT_GRID: tuple[tuple[float, float], ...] = ((0.75, 0.2), (0.7, 0.2), (0.5, 0.4), (0.3, 0.6))
PAPER_PCT_BETAS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)


def paper_grid(
    kinds: tuple[str, ...],
    rcat_grid: tuple[tuple[float, float], ...] = PAPER_RCAT_GRID,
    pct_betas: tuple[float, ...] = PAPER_PCT_BETAS,
) -> list[dict[str, Any]]:
    """The loss settings of the grids (the paper's by default) for the given loss kinds, in a fixed order."""
    out: list[dict[str, Any]] = []
    for kind in kinds:
        if kind == "rcat":
            out += [{"kind": "rcat", "alpha": a, "beta": b} for a, b in rcat_grid]
        elif kind in ("pct", "pcat"):
            out += [{"kind": kind, "alpha": 1.0, "beta": b} for b in pct_betas]
        elif kind == "at":
            out.append({"kind": "at", "alpha": 0.0, "beta": 0.0})
        else:
            raise ValueError(f"unknown loss kind '{kind}'")
    return out


def sample_simplex(
    rng: np.random.Generator, alpha_range: tuple[float, float], beta_range: tuple[float, float]
) -> tuple[float, float]:
    """(alpha, beta) uniform on {alpha, beta >= 0, alpha + beta <= 1} within the ranges (rejection sampling)."""
    for _ in range(10_000):
        a, b, _c = rng.dirichlet((1.0, 1.0, 1.0))
        if alpha_range[0] <= a <= alpha_range[1] and beta_range[0] <= b <= beta_range[1]:
            # rounded for readable trial names, then put back inside the ranges that rounding can leave
            a = min(max(round(float(a), 4), alpha_range[0]), alpha_range[1])
            b = min(max(round(float(b), 4), beta_range[0]), beta_range[1], 1.0 - a)
            return a, b
    raise ValueError(f"the ranges alpha {alpha_range}, beta {beta_range} leave no room on the simplex a + b <= 1")


def random_trials(
    kinds: tuple[str, ...],
    n: int,
    seed: int,
    *,
    alpha_range=(0.0, 1.0),
    beta_range=(0.0, 1.0),
    pct_beta_range=(0.5, 10.0),
) -> list[dict[str, Any]]:
    """``n`` random loss settings, cycling over ``kinds``; RCAT on the simplex, PCT/PCAT beta log-uniform."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "rcat":
            a, b = sample_simplex(rng, alpha_range, beta_range)
            out.append({"kind": "rcat", "alpha": a, "beta": b})
        elif kind in ("pct", "pcat"):
            lo, hi = np.log(pct_beta_range[0]), np.log(pct_beta_range[1])
            out.append({"kind": kind, "alpha": 1.0, "beta": round(float(np.exp(rng.uniform(lo, hi))), 4)})
        else:
            out.append({"kind": "at", "alpha": 0.0, "beta": 0.0})
    return out


def expand(
    losses: list[dict[str, Any]],
    *,
    train_eps: tuple[float, ...] = (),
    lr: tuple[float, ...] = (),
    epochs: tuple[int, ...] = (),
) -> list[dict[str, Any]]:
    """Cross the loss settings with the optional choices of training eps, learning rate and epochs."""
    axes = [("train_eps", train_eps or (None,)), ("lr", lr or (None,)), ("epochs", epochs or (None,))]
    trials = []
    for loss, *values in itertools.product(losses, *(v for _, v in axes)):
        trial: dict[str, Any] = {"loss": dict(loss)}
        for (name, _), value in zip(axes, values, strict=True):
            if value is not None:
                trial[name] = value
        trials.append(trial)
    return trials
