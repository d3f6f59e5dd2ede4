"""One epoch of constrained adversarial fine-tuning (RCAT, PCT, PCAT, AT), and the pieces around it.

Ray-free: Ray Train calls :func:`finetune_epoch` on every worker with a DDP-wrapped model, a local test calls
it with a plain module. The frozen models (the old model and f_theta0) are in eval mode without gradients;
the training attack is crafted against the unwrapped model in eval mode and full precision. A share's loss
is weighted by its size, RCAT's masked terms divide by the global batch's mask counts (:func:`group_sum`)
and BatchNorm takes the global batch's statistics (:mod:`rcat_ray.core.batchnorm`), so one worker and N
workers train the same model up to float rounding (batches: :mod:`.batches`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from rcat_ray.config import LossConfig, OptimizerConfig, TrainAttackConfig
from rcat_ray.core.finetune_epoch.batches import Batch, global_batch_start
from rcat_ray.core.losses import at_loss, pct_loss, rcat_loss
from rcat_ray.core.progress import Progress
from rcat_ray.core.training_attacks import fgsm_paper, fgsm_rs, pgd
from rcat_ray.errors import FinetuneInputError


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
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainAttackConfig,
    generator: torch.Generator | None,
    *,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training adversarial example x* against the model being trained, always in full precision.

    ``start`` is the random start (rows of the global batch's start, see :func:`global_batch_start`);
    without it the start is drawn from ``generator``. Autocast is switched off here (and again inside
    the attacks): under float16 the input gradient of a confident model underflows to zero.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        if cfg.kind == "fgsm-rs":
            return fgsm_rs(model, x, y, cfg.eps, generator=generator, start=start)
        if cfg.kind == "pgd":
            return pgd(model, x, y, cfg.eps, steps=cfg.steps, step_size=cfg.step_size, generator=generator, start=start)
        return fgsm_paper(model, x, y, cfg.eps, generator=generator, start=start)


class CachedMask:
    """The old model's per-sample robustness flags (r_old) from a stored table, looked up by sample id.

    ``robust`` holds 1 (robust), 0 (not robust) or -1 (not attacked: the table's ``robust`` is null).
    A sample the old model was never attacked on has no r_old; reading it as "not robust" would
    silently change the loss, so :meth:`check` refuses such a table before training.
    """

    def __init__(self, sample_ids: torch.Tensor, robust: torch.Tensor):
        size = int(sample_ids.max()) + 1 if sample_ids.numel() else 0
        self.flags = torch.full((size,), -2, dtype=torch.int8)  # -2: not in the table, -1: not attacked
        self.flags[sample_ids.long()] = robust.to(torch.int8)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long().cpu()
        out = torch.full(ids.shape, -2, dtype=torch.int8)
        inside = (ids >= 0) & (ids < self.flags.numel())
        out[inside] = self.flags[ids[inside]]
        return out

    def check(self, ids: torch.Tensor, table: str = "the cached table") -> None:
        """Raise :class:`FinetuneInputError` unless every training sample in ``ids`` has a flag."""
        flags = self._lookup(ids)
        missing, unattacked = int((flags == -2).sum()), int((flags == -1).sum())
        if missing or unattacked:
            parts = []
            if unattacked:
                parts.append(f"{unattacked} of the {ids.numel()} training samples were never attacked (robust is null)")
            if missing:
                parts.append(f"{missing} of the {ids.numel()} training samples are not in it")
            raise FinetuneInputError(
                f"mask_source 'cached' needs the old model's robustness flag of every training sample, but in "
                f"{table} {' and '.join(parts)}; evaluate the old model on the whole training split with "
                f"robust_samples unset, or use mask_source 'on-the-fly'"
            )

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flags = self._lookup(ids)
        if bool((flags < 0).any()):
            raise FinetuneInputError("a training sample has no stored robustness flag of the old model")
        return flags > 0


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast for the training forward in ``dtype`` (None: full precision)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


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
    start: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
    share: float | None = None,
) -> torch.Tensor:
    """The loss of one batch for the configured method (masks computed on x*).

    x* is crafted in full precision; only the forward passes that follow run under autocast in
    ``amp_dtype`` (None: full precision). ``share``: this batch is that fraction of a global batch split over
    a worker group, and losses that average over a mask take the whole global batch's mask count.
    """
    kind = loss_cfg.kind
    x_star = x if kind == "pct" else craft(attack_model, x, y, attack_cfg, generator, start=start)
    with autocast_context(x.device, amp_dtype):
        return _loss_on(model, theta0, old, x_star, y, ids, loss_cfg, cached_mask, share)


def _loss_on(
    model: nn.Module,
    theta0: nn.Module | None,
    old: nn.Module,
    x_star: torch.Tensor,
    y: torch.Tensor,
    ids: torch.Tensor,
    loss_cfg: LossConfig,
    cached_mask: CachedMask | None,
    share: float | None = None,
) -> torch.Tensor:
    kind = loss_cfg.kind
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
    totals = None
    if share is not None and loss_cfg.normalisation == "masked":
        counts = group_sum(torch.stack([m_new.sum(), m_old.sum()]).to(torch.float64))
        totals = (counts[0], counts[1])
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
        mask_totals=totals,
        share=share if totals is not None else 1.0,
    )


def group_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the training worker group (as they are, without a group): what a share needs
    of its global batch, such as RCAT's mask counts. Every rank calls it once per batch, in the same order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return values
    where = values.device if dist.get_backend() == "nccl" else torch.device("cpu")
    out = values.detach().to(where).clone()
    dist.all_reduce(out)
    return out.to(values.device)


def finetune_epoch(
    model: nn.Module,
    theta0: nn.Module | None,
    old: nn.Module,
    batches: Iterable[Batch] | Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_cfg: LossConfig,
    attack_cfg: TrainAttackConfig,
    *,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator | None = None,
    cached_mask: CachedMask | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Train ``model`` (a module or its DDP wrapper) for one pass over ``batches``.

    A batch is a :class:`Batch` share of a global batch (its random start comes from the global batch,
    its loss is weighted so that DDP averages to the global gradient) or a plain ``(x, y, sample_id)``
    tuple (random starts drawn in turn from ``generator``). Mixed precision: the training forward runs
    under autocast in ``amp_dtype``, or in float16 when only a GradScaler is given (GPU); the training
    attack always runs in full precision. Returns the mean loss over this worker's samples and their count.
    """
    attack_model = model.module if hasattr(model, "module") else model
    model.train()
    if amp_dtype is None and scaler is not None:
        amp_dtype = torch.float16
    total, seen = 0.0, 0
    for batch in batches:
        share = None
        if isinstance(batch, Batch):
            x_cpu, y_cpu, ids, weight = batch.x, batch.y, batch.ids, batch.loss_weight
            start = None if loss_cfg.kind == "pct" else global_batch_start(batch, attack_cfg.eps)
            share = batch.y.shape[0] / batch.global_size if batch.world_size > 1 else None
        else:
            (x_cpu, y_cpu, ids), weight, start = batch, 1.0, None
        x, y = x_cpu.to(device, non_blocking=True), y_cpu.to(device, non_blocking=True)
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
            start=start,
            amp_dtype=amp_dtype,
            share=share,
        )
        optimizer.zero_grad(set_to_none=True)
        scaled = loss * weight if weight != 1.0 else loss
        if scaler is not None:
            scaler.scale(scaled).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            scaled.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss became {value}; lower the learning rate")
        total += value * y.shape[0]
        seen += y.shape[0]
        if progress is not None:
            progress.update(1, extra=f"loss {total / seen:.4f}")
    return {"train_loss": total / max(seen, 1), "train_samples": float(seen)}
