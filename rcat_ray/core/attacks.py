"""Evaluation attacks: a pyautoattack cascade that yields one per-model row per sample (docs/contracts.md §2.1).

The cascade follows AutoAttack's rule (each attack only runs on the samples still robust after the
previous ones) but calls pyautoattack's attack classes directly, with their parameters passed to the
constructors, so that the table can record which attack broke each sample. Seeds are always explicit
and the caller's global RNG is left untouched (pyautoattack re-seeds it).

Seeding follows AutoAttack's own rule: every component of the cascade gets the one seed of the chunk
(``AutoAttack.run_standard_evaluation`` sets ``attack.seed = self.seed`` before each component, and each
component re-seeds torch with it in ``perturb``). A chunk's rows can therefore be re-checked with a plain
``pyautoattack.AutoAttack(model, attacks=[...], version="custom", seed=chunk_seed, ...)`` call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rcat_ray.config import AttackConfig
from rcat_ray.core.attack_checks import chunk_checks

#: The per-model table (docs/contracts.md §2.1). ``robust``/``adv_*`` are null for samples outside ``robust_samples``.
PER_MODEL_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("clean_pred", pa.int32(), nullable=False),
        pa.field("clean_correct", pa.bool_(), nullable=False),
        pa.field("adv_pred", pa.int32()),
        pa.field("robust", pa.bool_()),
        pa.field("clean_margin", pa.float32(), nullable=False),
        pa.field("adv_margin", pa.float32()),
        pa.field("perturbation_linf", pa.float32()),
        pa.field("broken_by", pa.string()),
        pa.field("min_margin", pa.float32()),
    ]
)


def chunk_seed(run_seed: int, chunk_id: int) -> int:
    """The seed of one work unit: a function of (run seed, chunk id) only, never of the worker."""
    digest = hashlib.sha256(f"rcat_ray:{run_seed}:{chunk_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the best other logit: > 0 iff correctly classified (ties aside)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    return true - other.max(dim=1).values


def _build_attack(name: str, model: nn.Module, cfg: AttackConfig, num_classes: int, seed: int, device: torch.device):
    """One pyautoattack component configured through its constructor."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack

    standard = cfg.attacks == ("standard",)
    n_iter = 100 if standard else cfg.n_iter
    n_restarts = 1 if standard else cfg.n_restarts
    targets = max(1, min(9 if standard else cfg.n_target_classes, num_classes - 1))
    common = {"norm": cfg.norm, "eps": cfg.eps, "seed": seed, "device": device, "verbose": False}
    if name in ("apgd-ce", "apgd-dlr"):
        if name == "apgd-dlr" and num_classes < 3:
            raise ValueError("apgd-dlr needs at least 3 classes")
        return APGDAttack(model, n_iter=n_iter, n_restarts=n_restarts, loss=name.split("-")[1], rho=0.75, **common)
    if name == "apgd-t":
        return APGDAttack_targeted(model, n_iter=n_iter, n_restarts=1, n_target_classes=targets, **common)
    if name == "fab-t":
        return FABAttack_PT(model, n_iter=n_iter, n_restarts=1, targeted=True, n_target_classes=targets, **common)
    if name == "square":
        return SquareAttack(
            model, n_queries=cfg.square_queries, p_init=0.8, n_restarts=1, resc_schedule=False, **common
        )
    raise ValueError(f"unknown attack {name}")


class _MarginTracker(nn.Module):
    """The model as an attack sees it: the same logits, and for each sample of the attacked batch the lowest
    true-class margin of any point the attack evaluated. Only passes over the whole batch are counted (when
    pyautoattack narrows a batch to a subset, its rows can no longer be told apart); a whole-batch pass always
    holds the batch's rows in order, because pyautoattack narrows by boolean masks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.y: torch.Tensor | None = None
        self.low: torch.Tensor | None = None

    def track(self, y: torch.Tensor | None) -> None:
        self.y = y
        self.low = None if y is None else torch.full((y.shape[0],), float("inf"), device=y.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.y is not None and out.dim() == 2 and out.shape[0] == self.y.shape[0]:
            with torch.no_grad():
                self.low = torch.minimum(self.low, margins(out.detach().float(), self.y))
        return out


#: attacks whose every evaluated point lies in the threat model's ball (FAB's iterates may leave it)
_IN_BALL = ("apgd-ce", "apgd-dlr", "apgd-t", "square")


@dataclass
class ChunkResult:
    """The rows of one chunk and, optionally, the adversarial images of its attacked samples."""

    table: pa.Table
    adversarial: np.ndarray | None  # float32 [n_attacked, C, H, W], rows of ``adversarial_ids``
    adversarial_ids: np.ndarray | None
    sanity: dict | None = None  # AutoAttack's checks on the attacked rows (rcat_ray.core.attack_checks)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return (
        torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)]) if x.shape[0] else x.new_zeros((0,))
    )


def evaluate_chunk(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sample_ids: torch.Tensor,
    cfg: AttackConfig,
    *,
    num_classes: int,
    seed: int,
    attack_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    keep_adversarial: bool = False,
    sanity_checks: bool = True,
) -> ChunkResult:
    """Attack one chunk as a single batch with the cascade and return its per-model rows.

    ``attack_mask`` marks the samples to attack (the first ``robust_samples`` of the split); the others
    get clean results only and null robust fields. A sample misclassified when clean is never attacked and
    never robust. The result depends only on the inputs and ``seed``, which seeds every attack of the
    cascade (as AutoAttack does), so pyautoattack's own AutoAttack with that seed gives the same rows.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    x = images.to(device, torch.float32)
    y = labels.to(device, torch.int64)
    n = x.shape[0]
    mask = torch.ones(n, dtype=torch.bool) if attack_mask is None else attack_mask.to(torch.bool).cpu()

    clean_logits = _logits(model, x)
    clean_pred = clean_logits.argmax(1)
    clean_correct = (clean_pred == y).cpu()
    clean_margin = margins(clean_logits, y).cpu()

    sanity = None
    if sanity_checks:  # AutoAttack's checks on the rows the cascade attacks (a few passes; fine-tuning skips them)
        rows = mask.nonzero().flatten().to(device)
        sanity = chunk_checks(model, x[rows], y[rows], clean_correct[mask], num_classes)

    x_adv = x.clone()
    broken_by: list[str | None] = [None] * n
    still_robust = (clean_correct & mask).clone()
    lowest = clean_margin.clone()  # the lowest margin any evaluated point reached, per sample
    tracker = _MarginTracker(model)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        for name in cfg.cascade:
            idx = still_robust.nonzero().flatten()
            if idx.numel() == 0:
                break
            seen = tracker if name in _IN_BALL else model
            attack = _build_attack(name, seen, cfg, num_classes, seed, device)  # one seed: AutoAttack's rule
            tracker.track(y[idx.to(device)] if seen is tracker else None)
            with torch.enable_grad():
                adv = attack.perturb(x[idx.to(device)], y[idx.to(device)]).detach()
            if tracker.low is not None:
                lowest[idx] = torch.minimum(lowest[idx], tracker.low.cpu())
            tracker.track(None)
            pred = _logits(model, adv).argmax(1)
            fooled = (pred != y[idx.to(device)]).cpu()
            hit = idx[fooled]
            x_adv[hit.to(device)] = adv[fooled.to(device)]
            still_robust[hit] = False
            for i in hit.tolist():
                broken_by[i] = name

    attacked = mask
    adv_logits = _logits(model, x_adv)
    adv_pred = adv_logits.argmax(1).cpu()
    adv_margin = margins(adv_logits, y).cpu()
    # L-inf size of each perturbation: 0 wherever no attack succeeded (x_adv is x there, bit for bit), so only the
    # broken rows are subtracted, rather than two temporaries the size of the whole chunk
    broken = (~still_robust & attacked & clean_correct).nonzero().flatten()
    pert = torch.zeros(n)
    if broken.numel():
        rows = broken.to(device)
        pert[broken] = (x_adv[rows] - x[rows]).abs().flatten(1).amax(1).cpu()
    robust = still_robust  # clean-correct, attacked, and withstood every attack
    lowest = torch.minimum(lowest, adv_margin)  # a broken sample's adversarial point counts too

    def nullable(values: torch.Tensor, typ: pa.DataType) -> pa.Array:
        arr = values.numpy()
        return pa.array(arr, type=typ, mask=~attacked.numpy())

    table = pa.table(
        {
            "sample_id": pa.array(sample_ids.numpy().astype(np.int64)),
            "label": pa.array(labels.numpy().astype(np.int32)),
            "clean_pred": pa.array(clean_pred.cpu().numpy().astype(np.int32)),
            "clean_correct": pa.array(clean_correct.numpy()),
            "adv_pred": nullable(adv_pred.to(torch.int32), pa.int32()),
            "robust": nullable(robust, pa.bool_()),
            "clean_margin": pa.array(clean_margin.numpy().astype(np.float32)),
            "adv_margin": nullable(adv_margin.to(torch.float32), pa.float32()),
            "perturbation_linf": nullable(pert.to(torch.float32), pa.float32()),
            "broken_by": pa.array(broken_by, type=pa.string()),
            "min_margin": nullable(lowest.to(torch.float32), pa.float32()),
        },
        schema=PER_MODEL_SCHEMA,
    )
    adversarial = adversarial_ids = None
    if keep_adversarial:
        keep = attacked.nonzero().flatten()
        adversarial = x_adv[keep.to(device)].cpu().numpy().astype(np.float32)
        adversarial_ids = sample_ids[keep].numpy().astype(np.int64)
    return ChunkResult(table=table, adversarial=adversarial, adversarial_ids=adversarial_ids, sanity=sanity)
