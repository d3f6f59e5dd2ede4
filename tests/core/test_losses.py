"""Fine-tuning losses against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rcat_ray.config import LossConfig, parse_config
from rcat_ray.core.losses import at_loss, kl_distance, logit_distance, pct_loss, rcat_loss
from rcat_ray.errors import ConfigError, LossConfigError

# two samples, K = 2 classes
Z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
Y = torch.tensor([0, 0])
Z_NEW = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
Z_OLD = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
# D(z, z_new): ((1)^2 + 0)/4 = 0.25 ; (0 + (-2)^2)/4 = 1.0
# D(z, z_old): (0 + 4)/4 = 1.0 ; (1 + 0)/4 = 0.25
CE = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0))]


def test_logit_distance_by_hand():
    assert logit_distance(Z, Z_NEW).tolist() == [0.25, 1.0]
    assert logit_distance(Z, Z_OLD).tolist() == [1.0, 0.25]


def test_rcat_masked_by_hand():
    m_new, m_old = torch.tensor([True, False]), torch.tensor([False, True])
    loss = rcat_loss(Z, Y, Z_NEW, Z_OLD, m_new, m_old, alpha=0.5, beta=0.3, normalisation="masked")
    expected = 0.2 * sum(CE) / 2 + 0.5 * 0.25 + 0.3 * 0.25
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_rcat_batch_by_hand_and_difference_to_masked():
    m_new, m_old = torch.tensor([True, False]), torch.tensor([False, True])
    batch = rcat_loss(Z, Y, Z_NEW, Z_OLD, m_new, m_old, alpha=0.5, beta=0.3, normalisation="batch")
    # L_new = mean(0.25, 1.0) (no mask); L_old = mean(0 * 1.0, 1 * 0.25)
    expected = 0.2 * sum(CE) / 2 + 0.5 * 0.625 + 0.3 * 0.125
    assert batch.item() == pytest.approx(expected, rel=1e-6)
    masked = rcat_loss(Z, Y, Z_NEW, Z_OLD, m_new, m_old, alpha=0.5, beta=0.3, normalisation="masked")
    # exactly the specified difference: a*(0.25 - 0.625) + b*(0.25 - 0.125)
    assert (masked - batch).item() == pytest.approx(0.5 * (0.25 - 0.625) + 0.3 * (0.25 - 0.125), rel=1e-6)


def test_empty_masks_are_finite_and_contribute_zero():
    none = torch.tensor([False, False])
    z = Z.clone().requires_grad_(True)
    loss = rcat_loss(z, Y, Z_NEW, Z_OLD, none, none, alpha=0.4, beta=0.4)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(0.2 * sum(CE) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert torch.isfinite(pct_loss(Z, Y, Z_OLD, none, alpha=1, beta=2))


def test_pct_mse_by_hand():
    m_old = torch.tensor([True, False])
    loss = pct_loss(Z, Y, Z_OLD, m_old, alpha=1.0, beta=2.0)
    expected = sum(CE) / 2 + ((1 + 2) * 1.0 + 1 * 0.25) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pct_kl_with_temperature():
    t = 100.0
    d = kl_distance(Z, Z_OLD, t)
    p = F.softmax(Z_OLD.double() / t, 1)
    q = F.softmax(Z.double() / t, 1)
    manual = (t**2 * (p * (p.log() - q.log())).sum(1)).float()
    assert torch.allclose(d, manual, rtol=1e-5)
    assert (d >= 0).all()
    m_old = torch.tensor([False, True])
    loss = pct_loss(Z, Y, Z_OLD, m_old, alpha=1.0, beta=1.0, divergence="kl", temperature=t)
    assert loss.item() == pytest.approx(sum(CE) / 2 + (manual[0] + 2 * manual[1]).item() / 2, rel=1e-5)


def test_at_is_cross_entropy():
    assert at_loss(Z, Y).item() == pytest.approx(sum(CE) / 2, rel=1e-6)


@pytest.mark.parametrize(("alpha", "beta"), [(0.7, 0.4), (-0.1, 0.5), (0.5, -0.1)])
def test_invalid_rcat_weights(alpha, beta):
    m = torch.tensor([True, True])
    with pytest.raises(LossConfigError):
        rcat_loss(Z, Y, Z_NEW, Z_OLD, m, m, alpha=alpha, beta=beta)
    with pytest.raises(ConfigError, match="alpha"):
        parse_config(LossConfig, {"kind": "rcat", "alpha": alpha, "beta": beta})


def test_pct_weights_may_exceed_one_but_not_be_negative():
    assert parse_config(LossConfig, {"kind": "pct", "alpha": 1, "beta": 10}).tag == "PCT(1,10)"
    with pytest.raises(ConfigError):
        parse_config(LossConfig, {"kind": "pcat", "alpha": -1, "beta": 1})


def test_unknown_loss_name():
    with pytest.raises(ConfigError, match="kind"):
        parse_config(LossConfig, {"kind": "rcatt"})
