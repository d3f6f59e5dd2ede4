"""Adversarial training from scratch of a built-in architecture: the demo's old and new models, and quick
baselines on small datasets (``rcat-ray train``). Written as a self-describing checkpoint that every model
source reads, with the recipe and the loss curve in its metadata."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from rcat_ray.config import DataConfig, StrictConfig
from rcat_ray.core.data import load_split
from rcat_ray.core.models import build_architecture, save_checkpoint
from rcat_ray.core.training import adversarial_train


class TrainRecipe(StrictConfig):
    """How one model is trained (its hash names the demo's cached checkpoint).

    The default: Adam with a one-cycle schedule peaking at ``lr`` (2e-3) after a ``warmup`` fraction (15%) of
    the steps and annealed to about 0, because only a converged model makes fine-tuning comparisons
    meaningful; ``constant`` keeps a fixed ``lr``.
    """

    arch: str = Field(description="built-in architecture: mlp, small_cnn, ...")
    arch_kwargs: dict = Field(default_factory=dict, description="keyword arguments of the architecture")
    epochs: int = Field(..., ge=1, description="training epochs")
    train_samples: int | None = Field(None, ge=1, description="the first N images of the train split (None: all)")
    batch_size: int = Field(128, ge=1, description="training batch")
    lr: float = Field(2e-3, gt=0, description="Adam's learning rate (the one-cycle maximum)")
    schedule: Literal["onecycle", "constant"] = Field(
        "onecycle", description="learning-rate schedule: onecycle (warm-up, then annealed to about 0) or constant"
    )
    warmup: float = Field(0.15, gt=0, lt=1, description="one-cycle warm-up fraction of the steps")
    eps: float = Field(0.1, gt=0, le=1, description="FGSM-RS training budget, Linf in [0,1] pixel units")
    seed: int = Field(0, description="seed of the initial weights, the shuffling and the random starts")


def train_checkpoint(recipe: TrainRecipe, data: DataConfig, path: Path, name: str = "model") -> Path:
    """Train ``recipe`` with FGSM-RS on the train split of ``data`` and write the checkpoint to ``path``."""
    split = load_split(data.model_copy(update={"split": "train", "offset": 0, "limit": recipe.train_samples}))
    torch.manual_seed(recipe.seed)
    model = build_architecture(
        recipe.arch, num_classes=split.num_classes, input_shape=split.input_shape, **recipe.arch_kwargs
    )
    t0 = time.perf_counter()
    losses = adversarial_train(
        model,
        split.images,
        split.labels,
        epochs=recipe.epochs,
        eps=recipe.eps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        schedule=recipe.schedule,
        warmup=recipe.warmup,
        seed=recipe.seed,
        desc=name,
    )
    print(f"[train] {name}: {recipe.arch} in {time.perf_counter() - t0:.0f} s (final loss {losses[-1]:.3f}) -> {path}")
    save_checkpoint(
        path,
        model,
        arch=recipe.arch,
        num_classes=split.num_classes,
        input_shape=split.input_shape,
        arch_kwargs=recipe.arch_kwargs,
        metadata={"recipe": recipe.model_dump(), "data": data.model_dump(mode="json"), "losses": losses},
    )
    return path
