"""The config of `rcat-ray sweep`: the grid or random space of fine-tuning weights and how a choice is made."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from rcat_ray.config import (
    AttackConfig,
    BootstrapConfig,
    ComputeConfig,
    EvaluationSettings,
    LocalPath,
    LossConfig,
    LossKind,
    StrictConfig,
)
from rcat_ray.evaluate.config import CONFIRM_ATTACK_FIELD
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.sweep.search_space import PAPER_PCT_BETAS, PAPER_RCAT_GRID

#: Resume a sweep: True (its saved state must exist), False (start anew), "auto" (resume when saved, else start).
Resume = bool | Literal["auto"]


class SweepSpace(StrictConfig):
    """What a sweep varies. ``grid`` mode uses the paper's grids for ``losses``; ``search`` mode samples."""

    losses: tuple[LossKind, ...] = Field(("rcat",), min_length=1, description="losses to search")
    rcat_grid: tuple[tuple[float, float], ...] = Field(
        PAPER_RCAT_GRID, min_length=1, description="grid mode: RCAT (alpha, beta) points (default: the paper's)"
    )
    pct_betas: tuple[float, ...] = Field(
        PAPER_PCT_BETAS, min_length=1, description="grid mode: PCT/PCAT beta values, alpha 1 (default: the paper's)"
    )
    alpha_range: tuple[float, float] = Field((0.0, 1.0), description="RCAT alpha range (search mode)")
    beta_range: tuple[float, float] = Field((0.0, 1.0), description="RCAT beta range (search mode)")
    pct_beta_range: tuple[float, float] = Field((0.5, 10.0), description="PCT/PCAT beta range, alpha = 1")
    train_eps: tuple[float, ...] = Field((), description="training eps choices (default: the base's)")
    lr: tuple[float, ...] = Field((), description="learning-rate choices (default: the base's)")
    epochs: tuple[int, ...] = Field((), description="epoch choices (default: the base's)")

    @model_validator(mode="after")
    def _grid_points_are_losses(self) -> SweepSpace:
        """A bad grid point is refused when the config is read, not when its trial starts."""
        for a, b in self.rcat_grid:
            LossConfig(kind="rcat", alpha=a, beta=b)
        for b in self.pct_betas:
            LossConfig(kind="pct", alpha=1.0, beta=b)
        return self


class AshaConfig(StrictConfig):
    """Early stopping of trials on the per-epoch validation S-NFR."""

    enabled: bool = Field(True, description="stop poor trials early with ASHA")
    grace_period: int = Field(1, ge=1, description="epochs before ASHA may stop a trial")
    reduction_factor: int = Field(2, ge=2, description="ASHA reduction factor")


class ChoiceValidationConfig(StrictConfig):
    """How the finished trials are judged for the choice rule: the test-strength attack on a validation set
    large enough for confidence intervals. The cheap per-epoch validation only drives progress and ASHA: a weak
    attack rewarded a model that the strong test attack then broke."""

    enabled: bool = Field(True, description="choose on a fresh evaluation of each trial's model on the validation set")
    samples: int = Field(2000, ge=1, description="validation samples (the val split's head)")
    attack: AttackConfig | None = Field(
        None,
        description="default: APGD-CE + APGD-DLR, 50 iterations, at the test eps when the sweep has test settings, "
        "else at the base's training eps",
    )
    chunk_size: int = Field(250, ge=1, description="samples per work unit of that evaluation")


class SweepConfig(StrictConfig):
    """``rcat-ray sweep``: search the constraint weights (and eps, lr, epochs) of fine-tuning with Ray Tune."""

    base: FinetuneConfig = Field(description="the fine-tune every trial starts from (its compute: each trial's)")
    mode: Literal["grid", "search"] = Field("grid", description="grid (the paper's grids) or search (sampled trials)")
    algorithm: Literal["random", "optuna"] = Field("random", description="search algorithm: random or optuna")
    num_samples: int = Field(8, ge=1, description="trials in search mode")
    seed: int = Field(0, description="seed of the search")
    space: SweepSpace = SweepSpace()
    asha: AshaConfig = AshaConfig()
    cpus_per_trial: float = Field(
        1.0, gt=0, description="CPUs of a trial that trains in its own process (base.compute.num_workers 0 or 1)"
    )
    gpus_per_trial: float = Field(
        0.0, ge=0, description="GPUs of a trial that trains in its own process (a fraction packs trials on a GPU)"
    )
    max_concurrent: int | None = Field(None, ge=1, description="default: what the cluster's resources allow")
    tolerance: float = Field(0.02, ge=0, description="choice: allowed drop of validation robust accuracy")
    choice: ChoiceValidationConfig = ChoiceValidationConfig()
    compute: ComputeConfig = Field(
        ComputeConfig(),
        description="the sweep's Ray (address, local_cpus) and the evaluation actors that judge the trials",
    )
    name: str = Field("sweep", min_length=1, description="the sweep's name (its folder in the Tune storage)")
    storage: LocalPath = Field("ray_results", validate_default=True, description="Ray Tune storage path")
    out: LocalPath = Field(
        "sweep-out", validate_default=True, description="folder for trials.parquet, best.yaml, plots and the report"
    )
    test: EvaluationSettings | None = Field(None, description="evaluate the chosen model on this (test) data")
    bootstrap: BootstrapConfig = BootstrapConfig()
    confirm: bool = Field(
        False, description="test: re-check every robustness flip with a stronger attack (R-NFR confirmed)"
    )
    confirm_attack: AttackConfig | None = CONFIRM_ATTACK_FIELD
