"""Fine-tuning losses: RCAT, PCT, PCAT and plain adversarial training (AT); definitions in docs/contracts.md §1.2.

Pure functions of logits, labels and masks, so each can be checked by hand on small tensors and reused
by any training loop. Notation: ``z`` the logits of the model being trained, ``z_new`` those of the
frozen copy of the new model taken before fine-tuning (f_theta0), ``z_old`` those of the frozen old
model, ``m_new``/``m_old`` boolean masks of the samples each frozen model classifies correctly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rcat_ray.errors import LossConfigError

Normalisation = Literal["masked", "batch"]
Divergence = Literal["mse", "kl"]


def logit_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample D(a, b) = ||a - b||^2 / (2K): logit matching without temperature."""
    return (a - b).pow(2).sum(dim=1) / (2 * a.shape[1])


def kl_distance(z: torch.Tensor, z_ref: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T^2 * KL(softmax(z_ref/T) || softmax(z/T)): PCT's distillation option."""
    # in float64: at T = 100 the T^2 factor turns float32 rounding of the log-probabilities into visible error
    log_p = F.log_softmax(z_ref.double() / temperature, dim=1)
    log_q = F.log_softmax(z.double() / temperature, dim=1)
    return (temperature**2 * (log_p.exp() * (log_p - log_q)).sum(dim=1)).to(z.dtype)


def _masked_mean(
    values: torch.Tensor, mask: torch.Tensor, total: torch.Tensor | None = None, share: float = 1.0
) -> torch.Tensor:
    """Mean over the masked samples; exactly 0 (with a gradient path) when the mask is empty, never NaN.

    A worker that holds a ``share`` (fraction) of a global batch passes the mask count of the whole global batch
    as ``total``: the sum over its rows is divided by ``total * share``, so that the share-weighted average of the
    workers' terms is the global batch's masked mean (one denominator for every worker, not one per share).
    """
    m = mask.to(values.dtype)
    count = m.sum() if total is None else total.to(values.dtype)
    return (values * m).sum() / (count.clamp_min(1.0) * share)


def check_rcat_weights(alpha: float, beta: float) -> None:
    """RCAT needs alpha, beta >= 0 and alpha + beta <= 1 (the CE weight 1 - alpha - beta must stay >= 0)."""
    if alpha < 0 or beta < 0:
        raise LossConfigError(f"RCAT weights must be >= 0, got alpha={alpha}, beta={beta}")
    if alpha + beta > 1 + 1e-12:
        raise LossConfigError(f"RCAT needs alpha + beta <= 1, got alpha={alpha} + beta={beta} = {alpha + beta}")


def check_pct_weights(alpha: float, beta: float) -> None:
    """PCT/PCAT weights are any non-negative numbers (the paper uses alpha = 1, beta in {1, 2, 5, 10})."""
    if alpha < 0 or beta < 0:
        raise LossConfigError(f"PCT weights must be >= 0, got alpha={alpha}, beta={beta}")


def rcat_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    z_new: torch.Tensor,
    z_old: torch.Tensor,
    m_new: torch.Tensor,
    m_old: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    normalisation: Normalisation = "masked",
    mask_totals: tuple[torch.Tensor, torch.Tensor] | None = None,
    share: float = 1.0,
) -> torch.Tensor:
    """L = (1 - a - b) CE(z, y) + a L_new + b L_old, all on the same adversarial batch.

    ``masked`` (the authors' current code): each term averages D over its own mask. ``batch`` (their
    CIFAR-10 runs): L_new is the unmasked batch mean and L_old the batch mean of m_old * D. When the batch is
    one worker's ``share`` of a global batch, ``mask_totals`` are the (m_new, m_old) counts of the whole global
    batch, so ``masked`` averages over the global mask as one process would.
    """
    check_rcat_weights(alpha, beta)
    ce = F.cross_entropy(z, y)
    d_new = logit_distance(z, z_new)
    d_old = logit_distance(z, z_old)
    if normalisation == "masked":
        t_new, t_old = mask_totals if mask_totals is not None else (None, None)
        l_new, l_old = _masked_mean(d_new, m_new, t_new, share), _masked_mean(d_old, m_old, t_old, share)
    elif normalisation == "batch":
        l_new, l_old = d_new.mean(), (d_old * m_old.to(d_old.dtype)).mean()
    else:
        raise LossConfigError(f"unknown normalisation '{normalisation}' (masked or batch)")
    return (1 - alpha - beta) * ce + alpha * l_new + beta * l_old


def pct_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    z_old: torch.Tensor,
    m_old: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    divergence: Divergence = "mse",
    temperature: float = 100.0,
) -> torch.Tensor:
    """PCT focal distillation: L = CE(z, y) + mean_i (a + b m_old_i) D(z_i, z_old_i).

    PCAT is the same function applied to adversarial inputs with masks from those inputs.
    """
    check_pct_weights(alpha, beta)
    if divergence == "mse":
        d = logit_distance(z, z_old)
    elif divergence == "kl":
        d = kl_distance(z, z_old, temperature)
    else:
        raise LossConfigError(f"unknown divergence '{divergence}' (mse or kl)")
    weights = alpha + beta * m_old.to(d.dtype)
    return F.cross_entropy(z, y) + (weights * d).mean()


def at_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain adversarial fine-tuning: cross-entropy on the adversarial batch (the unconstrained baseline)."""
    return F.cross_entropy(z, y)
