"""AutoAttack's sanity checks: small models made to trip each flag, and a trained model that trips none."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rcat_ray.config import AttackConfig, DataConfig
from rcat_ray.core.attack_checks import describe_flags, dlr_loss, table_checks
from rcat_ray.core.attacks import evaluate_chunk
from rcat_ray.core.data import load_split


@pytest.fixture(scope="module")
def digits_test():
    return load_split(DataConfig(name="digits", split="test", limit=120))


class Noisy(nn.Module):
    """A randomised defence: noise on the input at every forward pass, in eval mode too."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


class Quantised(nn.Module):
    """Gradient masking: the input is rounded to quarter steps, so every input gradient is exactly 0."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def _evaluate(module, split, attacks=("apgd-ce", "apgd-dlr"), **kw):
    cfg = AttackConfig(eps=0.1, n_iter=10, attacks=attacks, **kw)
    result = evaluate_chunk(
        copy.deepcopy(module), split.images, split.labels, split.sample_ids, cfg, num_classes=10, seed=3
    )
    return result, table_checks([result.sanity], result.table, cfg.cascade)


def test_a_trained_model_raises_no_flag(digits_models, digits_test):
    _, new = digits_models
    result, record = _evaluate(new.module, digits_test)
    assert record["flags"] == []
    assert record["chunks_checked"] == record["chunks"] == 1
    assert record["gradient_checked"] == int(result.table.column("clean_correct").to_numpy().sum())
    assert describe_flags(record) == "sanity checks: no flag"


def test_randomised_model_is_flagged(digits_models, digits_test):
    _, new = digits_models
    _, record = _evaluate(Noisy(new.module), digits_test)
    assert "randomized" in record["flags"]


def test_probability_outputs_are_flagged(digits_models, digits_test):
    _, new = digits_models
    _, record = _evaluate(nn.Sequential(new.module, nn.Softmax(dim=1)), digits_test)
    assert "probability_outputs" in record["flags"] and "randomized" not in record["flags"]


def test_zero_gradients_and_square_breaks_are_flagged(digits_models, digits_test):
    """Rounding masks every gradient; Square (no gradients) then breaks samples APGD could not."""
    _, new = digits_models
    result, record = _evaluate(
        Quantised(new.module), digits_test, attacks=("apgd-ce", "apgd-dlr", "square"), square_queries=300
    )
    assert record["zero_gradients"] == record["gradient_checked"] > 0
    broken = result.table.column("broken_by").to_pylist()
    assert record["square_breaks"] == broken.count("square") > 0
    assert {"zero_gradients", "square_breaks"} <= set(record["flags"])
    assert "zero_gradients (" in describe_flags(record) and "square_breaks (" in describe_flags(record)


def test_the_checks_leave_the_rows_unchanged(digits_models, digits_test):
    """The checks draw random numbers (a randomised model) under their own state: the rows are what the
    cascade alone gives, so tables stored before the checks existed stay valid."""
    _, new = digits_models
    a, _ = _evaluate(new.module, digits_test)
    b, _ = _evaluate(new.module, digits_test)
    assert a.table.equals(b.table)
    cfg = AttackConfig(eps=0.1, n_iter=10)
    before = torch.random.get_rng_state()
    evaluate_chunk(
        new.module, digits_test.images, digits_test.labels, digits_test.sample_ids, cfg, num_classes=10, seed=3
    )
    assert torch.equal(before, torch.random.get_rng_state())


def test_chunks_without_checks_are_counted():
    import pyarrow as pa

    from rcat_ray.core.attacks import PER_MODEL_SCHEMA

    table = pa.table(
        {
            "sample_id": [0, 1],
            "label": [0, 1],
            "clean_pred": [0, 1],
            "clean_correct": [True, True],
            "adv_pred": [0, 0],
            "robust": [True, False],
            "clean_margin": [1.0, 1.0],
            "adv_margin": [1.0, -1.0],
            "perturbation_linf": [0.0, 0.1],
            "broken_by": [None, "apgd-ce"],
            "min_margin": [0.5, -1.0],
        },
        schema=PER_MODEL_SCHEMA,
    )
    record = table_checks([None], table, ("apgd-ce",))
    assert (record["chunks"], record["chunks_checked"], record["flags"]) == (1, 0, [])
    assert "on 0 of 1 chunks" in describe_flags(record)
    assert describe_flags(None).startswith("sanity checks: not run")


def test_dlr_loss_matches_pyautoattack():
    from pyautoattack.autopgd_base import APGDAttack

    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    reference = APGDAttack(nn.Identity(), eps=0.1, device="cpu").dlr_loss(logits, y)
    torch.testing.assert_close(dlr_loss(logits, y), reference)
