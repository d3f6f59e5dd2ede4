"""The config of `rcat-ray nightly`: the production model, tonight's candidate, the gates and where the verdict goes."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    ConfigDict,
    Field,
    model_validator,
)

from rcat_ray.config import (
    AttackConfig,
    BootstrapConfig,
    EvaluationSettings,
    LocalPath,
    ModelConfig,
    StrictConfig,
)
from rcat_ray.evaluate.config import CONFIRM_ATTACK_FIELD, CONFIRM_FIELD, NEAR_MARGIN_FIELD

SanityFlag = Literal["randomized", "probability_outputs", "zero_gradients", "square_breaks"]


class ClassGate(StrictConfig):
    """Gates for one class (by index), judged on that class's per-class metrics."""

    class_index: int = Field(..., ge=0, alias="class", description="the class, by index")
    max_nfr: float | None = Field(None, ge=0, le=1, description="fail when this class's NFR is above this")
    max_r_nfr: float | None = Field(None, ge=0, le=1, description="fail when this class's R-NFR is above this")
    max_s_nfr: float | None = Field(None, ge=0, le=1, description="fail when this class's S-NFR is above this")
    max_near_flip: float | None = Field(
        None, ge=0, le=1, description="fail when this class's near-flip rate is above this"
    )
    min_acc: float | None = Field(
        None, ge=0, le=1, description="fail when the candidate's clean accuracy on this class is below this"
    )
    min_rob_acc: float | None = Field(
        None, ge=0, le=1, description="fail when the candidate's robust accuracy on this class is below this"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GatesConfig(StrictConfig):
    """Thresholds (fractions, not %) a candidate must meet. A max gate fails only when the lower CI bound is
    above it, a min gate only when the upper CI bound is below it (``judge_on: ci``): a gate fails when the
    evidence says so. ``judge_on: value`` compares the point estimate instead."""

    max_nfr: float | None = Field(None, ge=0, le=1, description="fail when NFR is above this (a fraction)")
    max_r_nfr: float | None = Field(None, ge=0, le=1, description="fail when R-NFR is above this (a fraction)")
    max_s_nfr: float | None = Field(None, ge=0, le=1, description="fail when S-NFR is above this (a fraction)")
    max_near_flip: float | None = Field(
        None, ge=0, le=1, description="fail when the near-flip rate (at near_margin) is above this (a fraction)"
    )
    min_acc: float | None = Field(
        None, ge=0, le=1, description="fail when the candidate's clean accuracy is below this"
    )
    min_rob_acc: float | None = Field(
        None, ge=0, le=1, description="fail when the candidate's robust accuracy is below this"
    )
    judge_on: Literal["ci", "value"] = Field(
        "ci", description="judge each gate on its CI bound (ci) or on the point estimate (value)"
    )
    per_class: tuple[ClassGate, ...] = ()
    accept_flags: tuple[SanityFlag, ...] = Field(
        (),
        description="AutoAttack sanity flags of the candidate's evaluation that do not stop the night (any other "
        "flag: could not judge, exit 2): randomized, probability_outputs, zero_gradients, square_breaks",
    )


class NotifyConfig(StrictConfig):
    """Where the verdict goes besides the exit code and the verdict file."""

    kind: Literal["stdout", "file", "webhook"] = Field(
        "stdout", description="where the verdict goes: stdout, file or webhook"
    )
    path: LocalPath | None = Field(None, description="file notifier: append one JSON line per night")
    url: str | None = Field(None, description="webhook notifier: POST the verdict as JSON")
    timeout_s: float = Field(10.0, gt=0, description="webhook timeout, seconds")

    @model_validator(mode="after")
    def _target(self) -> NotifyConfig:
        if self.kind == "file" and not self.path:
            raise ValueError("notify.path is required for the file notifier")
        if self.kind == "webhook" and not self.url:
            raise ValueError("notify.url is required for the webhook notifier")
        return self


class NightlyConfig(EvaluationSettings):
    """``rcat-ray nightly``: gate tonight's candidate against the production (baseline) model."""

    pair: str = Field("production-vs-candidate", min_length=1, description="name of the gated pair")
    baseline: ModelConfig
    candidate: ModelConfig | None = None
    candidate_dir: LocalPath | None = Field(None, description="take the newest *.pt checkpoint in this folder")
    gates: GatesConfig = GatesConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    near_margin: float = NEAR_MARGIN_FIELD
    confirm: bool = CONFIRM_FIELD
    confirm_attack: AttackConfig | None = CONFIRM_ATTACK_FIELD
    history: LocalPath = Field("history", validate_default=True, description="Parquet dataset of nights, by date")
    out: LocalPath = Field(
        "nightly-out", validate_default=True, description="folder for verdict.json and the report of each night"
    )
    notify: NotifyConfig = NotifyConfig()
    date: str | None = Field(None, description="the night's date (YYYY-MM-DD); default today (UTC)")

    @model_validator(mode="after")
    def _one_candidate(self) -> NightlyConfig:
        if (self.candidate is None) == (self.candidate_dir is None):
            raise ValueError("give exactly one of candidate (a model source) and candidate_dir")
        return self
