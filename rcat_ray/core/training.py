"""Adversarial training from scratch (FGSM-RS), used to build the demo's old and new models.

Deterministic for a seed: the data order and the attack's random starts come from explicit generators.

The default schedule is one-cycle (warm-up to the maximum learning rate, then annealing to about 0):
the paper fine-tunes *converged* models, and a model left at a constant learning rate is not converged,
so any fine-tuning (plain AT included) would keep improving it and blur the comparison of the methods.
Progress is logged as plain lines (:class:`rcat_ray.core.progress.Progress`), which read the same in a
terminal and in ``make demo | tee log``.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rcat_ray.core.progress import Progress
from rcat_ray.core.training_attacks import fgsm_rs

log = logging.getLogger("rcat_ray.core.progress")

Schedule = Literal["onecycle", "constant"]


def make_schedule(
    optimizer: torch.optim.Optimizer, schedule: Schedule, *, max_lr: float, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-batch learning-rate schedule of a from-scratch training run (None: constant).

    One-cycle is torch's ``OneCycleLR`` with its defaults (start at max_lr/25, cosine warm-up over the
    first ``warmup`` fraction of the steps, cosine annealing to max_lr/25/1e4, i.e. about 0): the
    annealing is what lets a short run end converged.
    """
    if schedule == "constant":
        return None
    if schedule != "onecycle":
        raise ValueError(f"unknown schedule {schedule!r}; expected 'onecycle' or 'constant'")
    if not 0 < warmup < 1:
        raise ValueError(f"warmup must be a fraction in (0, 1), got {warmup}")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(2, total_steps), pct_start=warmup
    )


def adversarial_train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    eps: float,
    batch_size: int = 128,
    lr: float = 1e-3,
    schedule: Schedule = "onecycle",
    warmup: float = 0.15,
    seed: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
    interval_s: float = 10.0,
) -> list[float]:
    """Train ``model`` in place with FGSM-RS adversarial examples and Adam; returns the mean loss per epoch.

    ``lr`` is the maximum learning rate of the one-cycle schedule, or the constant one. ``progress`` logs
    a line at most every ``interval_s`` seconds (done/total batches, ETA) and one per finished epoch.
    """
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = labels.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    sched = make_schedule(opt, schedule, max_lr=lr, total_steps=epochs * steps_per_epoch, warmup=warmup)
    order_gen = torch.Generator().manual_seed(seed)
    attack_gen = torch.Generator().manual_seed(seed + 1)
    bar = Progress(f"train {desc}", epochs * steps_per_epoch, "batches", interval_s=interval_s) if progress else None
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order_gen)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            x_adv = fgsm_rs(model, x, y, eps, generator=attack_gen)
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * y.shape[0]
            seen += y.shape[0]
            if bar is not None:
                bar.update(1, extra=f"epoch {epoch + 1}/{epochs}, loss {total / seen:.3f}")
        losses.append(total / max(seen, 1))
        if progress:
            log.info(
                "[train %s] epoch %d/%d done: loss %.4f, lr %.2e",
                desc,
                epoch + 1,
                epochs,
                losses[-1],
                opt.param_groups[0]["lr"],
            )
    if bar is not None:
        bar.close()
    model.eval()
    return losses
