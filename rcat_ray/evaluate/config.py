"""The configs of `rcat-ray evaluate`, `compare` and `table`: which models, on which data, under which attack."""

from __future__ import annotations

from pydantic import (
    Field,
)

from rcat_ray.config import (
    AttackConfig,
    BootstrapConfig,
    EvaluationSettings,
    LocalPath,
    ModelConfig,
    StrictConfig,
)
from rcat_ray.core.flips.metrics import NEAR_MARGIN

#: a comparison's near-flip threshold, in logits (core.flips.NEAR_MARGIN); part of the comparison's key
NEAR_MARGIN_FIELD = Field(
    NEAR_MARGIN,
    gt=0,
    description="a near-flip: a sample both models withstand whose new model's lowest margin under attack "
    "(true-class logit minus the best other) is below this",
)


CONFIRM_FIELD = Field(
    False,
    description="re-attack every robustness flip with a stronger attack (the old model on negative flips, the "
    "new on positive ones) and report R-NFR and R-PFR confirmed",
)
CONFIRM_ATTACK_FIELD = Field(
    None,
    description="the confirming attack (same norm and eps); default AutoAttack's standard cascade, 100 "
    "iterations, APGD-CE with 5 restarts",
)


class EvaluateConfig(EvaluationSettings):
    """``rcat-ray evaluate``: attack each model once and store its per-model table."""

    models: tuple[ModelConfig, ...] = Field(..., min_length=1)


class CompareConfig(EvaluationSettings):
    """``rcat-ray compare``: evaluate what is not cached, then compute flips of old -> new."""

    old: ModelConfig
    new: ModelConfig
    bootstrap: BootstrapConfig = BootstrapConfig()
    near_margin: float = NEAR_MARGIN_FIELD
    confirm: bool = CONFIRM_FIELD
    confirm_attack: AttackConfig | None = CONFIRM_ATTACK_FIELD
    report: LocalPath | None = Field(None, description="also write the HTML report into this folder")


class TableEntry(StrictConfig):
    """One row of a pair's table: a label (e.g. ``RCAT(0.5,0.4)``) and the model to evaluate."""

    label: str | None = Field(None, min_length=1, description="row label (default: the model's display name)")
    model: ModelConfig

    @property
    def display_name(self) -> str:
        return self.label or self.model.display_name


class TablePair(StrictConfig):
    """An old -> new update and the fine-tuned versions of ``new`` to compare against ``old``."""

    name: str = Field(..., min_length=1, description="the pair's name in the table")
    old: ModelConfig
    new: ModelConfig
    finetuned: tuple[TableEntry, ...] = ()
    reference: str | None = Field(None, description="row whose paired differences are shown (default: RCAT)")


class TableConfig(EvaluationSettings):
    """``rcat-ray table``: the paper-style table of one or more pairs (every model evaluated once, cached)."""

    pairs: tuple[TablePair, ...] = Field(..., min_length=1)
    bootstrap: BootstrapConfig = BootstrapConfig()
    near_margin: float = NEAR_MARGIN_FIELD
    confirm: bool = CONFIRM_FIELD
    confirm_attack: AttackConfig | None = CONFIRM_ATTACK_FIELD
    out: LocalPath = Field("table", validate_default=True, description="folder for table.md, table.tex, table.csv")
