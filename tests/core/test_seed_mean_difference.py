"""The study's seed-averaged paired difference (core.flips.seeds) against the one-seed paired difference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rcat_ray.core.flips import flip_table, paired_difference
from rcat_ray.core.flips.seeds import seed_mean_difference
from rcat_ray.errors import FlipInputError
from tests.core.test_flips import model_table


def _random_model(rng: np.random.Generator, labels: np.ndarray, p_clean: float, p_robust: float) -> pa.Table:
    n = labels.size
    clean = rng.random(n) < p_clean
    attacked = np.arange(n) < n * 3 // 4  # the robust subset: the first three quarters
    robust = [bool(c and rng.random() < p_robust) if a else None for c, a in zip(clean, attacked, strict=True)]
    return model_table(np.arange(n), labels, clean, robust)


@pytest.fixture(scope="module")
def tables() -> dict[str, list[pa.Table]]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    old = _random_model(rng, labels, 0.8, 0.6)
    a = [flip_table(old, _random_model(rng, labels, 0.85, 0.7)) for _ in range(3)]
    b = [flip_table(old, _random_model(rng, labels, 0.85, 0.6)) for _ in range(3)]
    return {"a": a, "b": b}


@pytest.mark.parametrize("metric", ["r_nfr", "nfr", "rob_acc", "acc"])
def test_each_seeds_value_is_the_paired_difference_and_the_value_their_mean(tables, metric) -> None:
    pairs = list(zip(tables["a"], tables["b"], strict=True))
    got = seed_mean_difference(pairs, metric, n_bootstrap=300)
    singles = [paired_difference(a, b, metric, n_bootstrap=0)["value"] for a, b in pairs]
    assert got["per_seed"] == pytest.approx(singles)
    assert got["value"] == pytest.approx(np.mean(singles))
    assert got["ci_low"] < got["value"] < got["ci_high"]
    assert got["seeds"] == 3 and got["n"] == (300 if metric in ("r_nfr", "rob_acc") else 400)


def test_averaging_narrows_the_interval_of_one_seed(tables) -> None:
    pairs = list(zip(tables["a"], tables["b"], strict=True))
    one = seed_mean_difference(pairs[:1], "rob_acc", n_bootstrap=1000)
    three = seed_mean_difference(pairs, "rob_acc", n_bootstrap=1000)
    single = paired_difference(*pairs[0], "rob_acc", n_bootstrap=1000)
    # one seed: the same interval as the paired difference (up to the bootstrap's own noise)
    assert one["ci_low"] == pytest.approx(single["ci_low"], abs=0.02)
    assert one["ci_high"] == pytest.approx(single["ci_high"], abs=0.02)
    assert three["ci_high"] - three["ci_low"] < one["ci_high"] - one["ci_low"]


def test_seeds_on_other_samples_are_refused(tables) -> None:
    a, b = tables["a"], tables["b"]
    shifted = a[1].set_column(0, "sample_id", pa.array(np.arange(400) + 1, pa.int64()))
    shifted_b = b[1].set_column(0, "sample_id", pa.array(np.arange(400) + 1, pa.int64()))
    with pytest.raises(FlipInputError, match="seed 1"):
        seed_mean_difference([(a[0], b[0]), (shifted, shifted_b)], "nfr")
    with pytest.raises(ValueError, match="at least one"):
        seed_mean_difference([], "nfr")
