"""Training attacks stay in the eps ball and [0, 1], restore the model's mode, leave the global RNG alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rcat_ray.core.training_attacks import fgsm_paper, fgsm_rs, pgd

EPS = 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("attack", [fgsm_rs, pgd, fgsm_paper])
def test_ball_box_mode_and_rng(attack):
    model = _model().train()
    model[2].eval()  # a submodule in its own mode must come back as it was
    x = torch.rand(32, 1, 8, 8)
    x[:4] = 0.0
    x[4:8] = 1.0  # on the box edges the projection matters
    y = torch.randint(0, 10, (32,))
    before = torch.get_rng_state()
    x_adv = attack(model, x, y, EPS, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2, "the attack must actually move the input"
    assert model.training and not model[2].training and model[1].training
    assert not x_adv.requires_grad


def test_attack_raises_the_loss():
    model = _model().eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        clean = ce(model(x), y).item()
        adv = ce(model(pgd(model, x, y, EPS, generator=torch.Generator().manual_seed(0))), y).item()
    assert adv > clean


def test_same_generator_seed_same_example():
    model = _model().eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    a = fgsm_rs(model, x, y, EPS, generator=torch.Generator().manual_seed(3))
    b = fgsm_rs(model, x, y, EPS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _confident(module: nn.Module) -> nn.Module:
    """A digits MLP made confident (logits x 4, median margin about 30): softmax probabilities of the other
    classes far below float16's smallest number but not float32's, so only a 16-bit input gradient underflows."""
    import copy

    model = copy.deepcopy(module).eval()
    with torch.no_grad():
        model[-1].weight.mul_(4)
        model[-1].bias.mul_(4)
    return model


@pytest.mark.parametrize("kind", ["fgsm-rs", "pgd", "paper"])
def test_training_attack_ignores_a_16_bit_autocast(digits_models, digits_train, kind):
    """Under float16 autocast the input gradient of a confident model underflows to exactly 0, and x* would
    be the random start alone. The training attack runs in full precision: the same x* as in float32,
    with its sign step on every sample where float32 has one."""
    from rcat_ray.config import TrainAttackConfig
    from rcat_ray.core.finetune_epoch import craft

    model = _confident(digits_models[1].module)
    x, y = digits_train.images[:256], digits_train.labels[:256]
    cfg = TrainAttackConfig(kind=kind, eps=EPS, steps=3)
    fp32 = craft(model, x, y, cfg, torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.float16):
        amp = craft(model, x, y, cfg, torch.Generator().manual_seed(5))
    assert amp.dtype == torch.float32
    # the sign-step part: what the attack added beyond the random start (clipped to the box)
    start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * EPS
    x0 = (x + start).clamp(0, 1)
    moved_fp32 = (fp32 - x0).flatten(1).abs().amax(1) > 0
    moved_amp = (amp - x0).flatten(1).abs().amax(1) > 0
    assert moved_fp32.float().mean() > 0.95
    assert torch.equal(moved_amp, moved_fp32)
    torch.testing.assert_close(amp, fp32, atol=0, rtol=0)


def test_a_given_start_replaces_the_generator():
    """A data-parallel worker attacks with its rows of the global batch's start: slicing the start of the
    whole batch gives the rows' x* of the whole batch."""
    from rcat_ray.core.training_attacks import uniform_start

    model = _model().eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    start = uniform_start(x.shape, EPS, torch.Generator().manual_seed(2))
    assert start.abs().max() <= EPS
    whole = fgsm_rs(model, x, y, EPS, start=start)
    assert torch.equal(whole, fgsm_rs(model, x, y, EPS, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(whole[4:10], fgsm_rs(model, x[4:10], y[4:10], EPS, start=start[4:10]))
    with pytest.raises(ValueError, match="shape"):
        pgd(model, x, y, EPS, start=start[:3])
