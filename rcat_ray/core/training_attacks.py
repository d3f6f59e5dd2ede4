"""Training-time attacks, crafted against the model being trained (docs/contracts.md §1.3).

Kept apart from the evaluation cascade: these are cheap (one or k gradient steps), run inside every
training step, and must not disturb the caller's RNG or the model's train/eval mode. Random starts
draw from an explicit ``torch.Generator``, or are handed in ready-made (``start``): a data-parallel
run draws the start of a whole global batch and gives each worker its rows, so that x* does not
depend on the number of workers.

Every attack runs in full precision even when the caller is inside ``torch.autocast``: in float16 the
input gradient of a confidently classified sample underflows to exactly zero, and x* would silently be
just the random start (no attack at all on exactly the samples a robust model gets right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def uniform_start(
    shape: tuple[int, ...] | torch.Size, eps: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random start, uniform in [-eps, eps], drawn on the generator's device (the CPU by default).

    Public so that a caller can draw the start of a larger batch than the one it attacks and slice it:
    element-wise arithmetic, so a slice equals what the attack would have drawn for those rows.
    """
    noise = torch.rand(tuple(shape), generator=generator, device="cpu" if generator is None else generator.device)
    return (noise * 2 - 1) * eps


def _start(x: torch.Tensor, eps: float, generator: torch.Generator | None, start: torch.Tensor | None) -> torch.Tensor:
    if start is None:
        start = uniform_start(x.shape, eps, generator)
    elif start.shape != x.shape:
        raise ValueError(f"the random start has shape {tuple(start.shape)}, the inputs {tuple(x.shape)}")
    return start.to(x.device, x.dtype)


def _full_precision(x: torch.Tensor) -> tuple[torch.Tensor, torch.autocast]:
    """Float32 inputs and autocast off for the attack (the caller's autocast state comes back afterwards)."""
    return (x.float() if x.dtype in _HALF else x), torch.autocast(device_type=x.device.type, enabled=False)


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y)
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
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """FGSM with a random start (Wong et al. 2020): uniform start in the eps ball, one step of 1.25*eps.

    The result is projected back onto the Linf ball around ``x`` and clipped to [0, 1]. ``start`` (same
    shape as ``x``, in [-eps, eps]) replaces the draw from ``generator``.
    """
    x, no_autocast = _full_precision(x)
    with _EvalMode(model), no_autocast:
        x0 = (x + _start(x, eps, generator, start)).clamp(0, 1)
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
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linf PGD-k on the cross-entropy; step size defaults to 2.5*eps/steps (Madry et al.).

    ``start`` (same shape as ``x``, in [-eps, eps]) replaces the random start drawn from ``generator``.
    """
    step = step_size if step_size is not None else 2.5 * eps / steps
    x, no_autocast = _full_precision(x)
    with _EvalMode(model), no_autocast:
        x_adv = (x + _start(x, eps, generator, start)).clamp(0, 1) if random_start else x.clone()
        for _ in range(steps):
            grad = _loss_grad(model, x_adv, y)
            x_adv = x_adv + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def fgsm_paper(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The RCAT authors' CIFAR-10 variant: the FGSM gradient is taken at the clean point, then added to a
    random start (step 1.25*eps), projected on the eps ball and clipped to [0, 1]."""
    x, no_autocast = _full_precision(x)
    with _EvalMode(model), no_autocast:
        grad = _loss_grad(model, x, y)
        x_adv = x + _start(x, eps, generator, start) + 1.25 * eps * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
