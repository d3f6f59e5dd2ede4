"""Validation flips during fine-tuning: the model being trained against the old model, every epoch.

A cheap version of the flip engine for a small validation subset: the old model's per-sample table is
computed once, the trained model's table each epoch, and the two are compared without bootstrap.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from rcat_ray.config import AttackConfig
from rcat_ray.core.attacks import evaluate_chunk
from rcat_ray.core.data import Split
from rcat_ray.core.flips import flip_table, summarize

#: The metrics each epoch reports (values in [0, 1]).
EPOCH_METRICS = ("acc", "rob_acc", "nfr", "r_nfr", "s_nfr", "pfr", "r_pfr")


def per_model_table(
    model: nn.Module, split: Split, attack: AttackConfig, num_classes: int, device: torch.device, chunk: int = 500
) -> pa.Table:
    """Per-sample results of one model on the validation subset (fixed chunks and seeds)."""
    was_training = model.training
    parts = []
    for i, start in enumerate(range(0, len(split), chunk)):
        sl = slice(start, start + chunk)
        parts.append(
            evaluate_chunk(
                model,
                split.images[sl],
                split.labels[sl],
                split.sample_ids[sl],
                attack,
                num_classes=num_classes,
                seed=attack.seed + i,
                device=device,
            ).table
        )
    model.train(was_training)
    return pa.concat_tables(parts)


def validation_flips(
    old_table: pa.Table, model: nn.Module, split: Split, attack: AttackConfig, num_classes: int, device: torch.device
) -> dict[str, float]:
    """Acc, RobAcc, NFR, R-NFR, S-NFR (and PFRs) of ``model`` against the old model's stored table."""
    new_table = per_model_table(model, split, attack, num_classes, device)
    summary = summarize(flip_table(old_table, new_table), n_bootstrap=0)
    return {f"val_{k}": float(summary["metrics"][k]["value"]) for k in EPOCH_METRICS}
