"""Validation flips during fine-tuning: the model being trained against the old model, every epoch.

A cheap version of the flip engine for a small validation subset: the old model's per-sample table is
computed once, the trained model's table each epoch, and the two are compared without bootstrap.

The subset is an in-memory ``Split`` or a prepared sample set (:class:`rcat_ray.core.samples.SampleSet`, what
fine-tuning workers use): a set is read one chunk at a time, so the worker that validates never holds the
whole subset (ImageNet's 224 px images are 600 kB each as float32). Both give bit-identical chunks
(``SampleSet.read_rows`` decodes exactly ``load_split``'s tensors), so the metrics do not depend on which.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from rcat_ray.config import AttackConfig
from rcat_ray.core.attacks import evaluate_chunk
from rcat_ray.core.data import Split
from rcat_ray.core.flips import flip_table, summarize
from rcat_ray.core.samples import SampleSet

#: The validation subset: in memory, or a prepared set read chunk by chunk.
ValidationData = Split | SampleSet

#: The metrics each epoch reports (values in [0, 1]).
EPOCH_METRICS = ("acc", "rob_acc", "nfr", "r_nfr", "s_nfr", "pfr", "r_pfr")


def _chunk(data: ValidationData, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, sample_ids) of rows [start, stop)."""
    if isinstance(data, Split):
        return data.images[start:stop], data.labels[start:stop], data.sample_ids[start:stop]
    return data.read_rows(start, stop)


def per_model_table(
    model: nn.Module,
    data: ValidationData,
    attack: AttackConfig,
    num_classes: int,
    device: torch.device,
    chunk: int = 500,
) -> pa.Table:
    """Per-sample results of one model on the validation subset (fixed chunks and seeds)."""
    was_training = model.training
    parts = []
    for i, start in enumerate(range(0, len(data), chunk)):
        images, labels, ids = _chunk(data, start, min(start + chunk, len(data)))
        parts.append(
            evaluate_chunk(
                model,
                images,
                labels,
                ids,
                attack,
                num_classes=num_classes,
                seed=attack.seed + i,
                device=device,
                sanity_checks=False,  # a per-epoch model-selection signal, not a table anyone reads flags from
            ).table
        )
    model.train(was_training)
    return pa.concat_tables(parts)


def validation_flips(
    old_table: pa.Table,
    model: nn.Module,
    data: ValidationData,
    attack: AttackConfig,
    num_classes: int,
    device: torch.device,
) -> dict[str, float]:
    """Acc, RobAcc, NFR, R-NFR, S-NFR (and PFRs) of ``model`` against the old model's stored table."""
    new_table = per_model_table(model, data, attack, num_classes, device)
    summary = summarize(flip_table(old_table, new_table), n_bootstrap=0)
    return {f"val_{k}": float(summary["metrics"][k]["value"]) for k in EPOCH_METRICS}
