"""One epoch of constrained adversarial fine-tuning (RCAT, PCT, PCAT, AT), and the pieces around it.

Ray-free: Ray Train calls :func:`finetune_epoch` on every worker with a DDP-wrapped model, a local test
calls it with a plain module. The frozen models (the old model and f_theta0, the new model before
fine-tuning) are in eval mode without gradients; the training attack is crafted against the unwrapped
model being trained, in eval mode, and its mode is restored afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import nn

from rcat_ray.config import LossConfig, OptimizerConfig, TrainAttackConfig
from rcat_ray.core.losses import at_loss, pct_loss, rcat_loss
from rcat_ray.core.training_attacks import fgsm_paper, fgsm_rs, pgd


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy in eval mode with no gradients: f_theta0, or the old model."""
    clone = copy.deepcopy(module).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def make_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer and (per step) schedule a config asks for."""
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return opt, sched


def craft(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainAttackConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """The training adversarial example x* against the model being trained."""
    if cfg.kind == "fgsm-rs":
        return fgsm_rs(model, x, y, cfg.eps, generator=generator)
    if cfg.kind == "pgd":
        return pgd(model, x, y, cfg.eps, steps=cfg.steps, step_size=cfg.step_size, generator=generator)
    return fgsm_paper(model, x, y, cfg.eps, generator=generator)


class CachedMask:
    """The old model's per-sample robustness flags (r_old) from a stored table, looked up by sample id."""

    def __init__(self, sample_ids: torch.Tensor, robust: torch.Tensor):
        size = int(sample_ids.max()) + 1 if sample_ids.numel() else 0
        self.flags = torch.full((size,), -1, dtype=torch.int8)
        self.flags[sample_ids.long()] = robust.to(torch.int8)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long().cpu()
        if ids.numel() and (int(ids.max()) >= self.flags.numel() or bool((self.flags[ids] < 0).any())):
            raise KeyError("a training sample has no stored robustness flag of the old model")
        return self.flags[ids] > 0


def batch_loss(
    model: nn.Module,
    attack_model: nn.Module,
    theta0: nn.Module | None,
    old: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ids: torch.Tensor,
    loss_cfg: LossConfig,
    attack_cfg: TrainAttackConfig,
    *,
    generator: torch.Generator | None = None,
    cached_mask: CachedMask | None = None,
) -> torch.Tensor:
    """The loss of one batch for the configured method (masks computed on x*, DESIGN §1.2)."""
    kind = loss_cfg.kind
    x_star = x if kind == "pct" else craft(attack_model, x, y, attack_cfg, generator)
    z = model(x_star)
    if kind == "at":
        return at_loss(z, y)
    with torch.no_grad():
        z_old = old(x_star).float()
    if kind in ("pct", "pcat"):
        m_old = z_old.argmax(1) == y
        return pct_loss(
            z.float(),
            y,
            z_old,
            m_old,
            alpha=loss_cfg.alpha,
            beta=loss_cfg.beta,
            divergence=loss_cfg.divergence,
            temperature=loss_cfg.temperature,
        )
    assert theta0 is not None, "RCAT needs the frozen copy of the new model"
    with torch.no_grad():
        z_new = theta0(x_star).float()
    m_new = z_new.argmax(1) == y
    if loss_cfg.mask_source == "cached":
        assert cached_mask is not None, "mask_source 'cached' needs the old model's flags"
        m_old = cached_mask(ids).to(y.device)
    else:
        m_old = z_old.argmax(1) == y
    return rcat_loss(
        z.float(),
        y,
        z_new,
        z_old,
        m_new,
        m_old,
        alpha=loss_cfg.alpha,
        beta=loss_cfg.beta,
        normalisation=loss_cfg.normalisation,
    )


def finetune_epoch(
    model: nn.Module,
    theta0: nn.Module | None,
    old: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_cfg: LossConfig,
    attack_cfg: TrainAttackConfig,
    *,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator | None = None,
    cached_mask: CachedMask | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: Iterable | None = None,
) -> dict[str, float]:
    """Train ``model`` (a module or its DDP wrapper) for one pass over ``batches`` of (x, y, sample_id).

    Mixed precision is used when a GradScaler is given (GPU). Returns the mean loss and sample count.
    """
    attack_model = model.module if hasattr(model, "module") else model
    model.train()
    total, seen = 0.0, 0
    amp = torch.autocast(device_type=device.type) if scaler is not None else nullcontext()
    for x_cpu, y_cpu, ids in batches:
        x, y = x_cpu.to(device, non_blocking=True), y_cpu.to(device, non_blocking=True)
        with amp:
            loss = batch_loss(
                model,
                attack_model,
                theta0,
                old,
                x,
                y,
                ids,
                loss_cfg,
                attack_cfg,
                generator=generator,
                cached_mask=cached_mask,
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * y.shape[0]
        seen += y.shape[0]
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    return {"train_loss": total / max(seen, 1), "train_samples": float(seen)}
