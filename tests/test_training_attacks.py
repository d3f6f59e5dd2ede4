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
