"""Adversarial training from scratch (FGSM-RS), used to build the demo's old and new models.

Deterministic for a seed: the data order and the attack's random starts come from explicit generators.
Shows a tqdm bar per epoch, since a CPU run takes minutes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rcat_ray.core.training_attacks import fgsm_rs


def adversarial_train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    eps: float,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place with FGSM-RS adversarial examples and Adam; returns the mean loss per epoch."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    attack_gen = torch.Generator().manual_seed(seed + 1)
    n = labels.shape[0]
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order_gen)
        total, seen = 0.0, 0
        bar = tqdm(
            range(0, n, batch_size),
            desc=f"{desc} epoch {epoch + 1}/{epochs}",
            disable=None if progress else True,  # None: off when not a terminal
            leave=False,
        )
        for start in bar:
            idx = perm[start : start + batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            x_adv = fgsm_rs(model, x, y, eps, generator=attack_gen)
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * y.shape[0]
            seen += y.shape[0]
        losses.append(total / max(seen, 1))
    model.eval()
    return losses
