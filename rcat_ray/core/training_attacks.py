"""Training-time attacks, crafted against the model being trained (DESIGN §1.3).

Kept apart from the evaluation cascade: these are cheap (one or k gradient steps), run inside every
training step, and must not disturb the caller's RNG or the model's train/eval mode. Random starts
draw from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _uniform_like(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator, device="cpu" if generator is None else generator.device)
    return (noise.to(x.device, x.dtype) * 2 - 1) * eps


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


class _EvalMode:
    """Put a model in eval mode for the attack and restore each submodule's own mode afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def fgsm_rs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """FGSM with a random start (Wong et al. 2020): uniform start in the eps ball, one step of 1.25*eps.

    The result is projected back onto the Linf ball around ``x`` and clipped to [0, 1].
    """
    with _EvalMode(model):
        delta = _uniform_like(x, eps, generator)
        x0 = (x + delta).clamp(0, 1)
        grad = _loss_grad(model, x0, y)
        x_adv = x0 + 1.25 * eps * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Linf PGD-k on the cross-entropy; step size defaults to 2.5*eps/steps (Madry et al.)."""
    step = step_size if step_size is not None else 2.5 * eps / steps
    with _EvalMode(model):
        x_adv = (x + _uniform_like(x, eps, generator)).clamp(0, 1) if random_start else x.clone()
        for _ in range(steps):
            grad = _loss_grad(model, x_adv, y)
            x_adv = x_adv + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def fgsm_paper(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The RCAT authors' CIFAR-10 variant: the FGSM gradient is taken at the clean point, then added to a
    random start (step 1.25*eps), projected on the eps ball and clipped to [0, 1]."""
    with _EvalMode(model):
        grad = _loss_grad(model, x, y)
        x_adv = x + _uniform_like(x, eps, generator) + 1.25 * eps * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
