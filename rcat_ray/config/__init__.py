"""Typed, validated run configurations, read from YAML and written back next to results.

Every knob of a run lives here so that a run is fully described by one object: the CLI and the job
scripts only build these objects, and the result store hashes them into cache keys. Validation happens
here, before any model is loaded or any attack runs, and a bad field is named in the error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from rcat_ray.config.parsing import deep_merge, load_yaml, parse_config, stable_hash, to_yaml

#: the config types, and the reading helpers of :mod:`.parsing` for the callers that import them from here
__all__ = [
    "STANDARD_CASCADE",
    "AttackConfig",
    "BootstrapConfig",
    "ComputeConfig",
    "DataConfig",
    "EvaluationSettings",
    "LocalPath",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "StrictConfig",
    "TrainAttackConfig",
    "WorkerCompute",
    "deep_merge",
    "is_uri",
    "load_yaml",
    "parse_config",
    "resolve_local_path",
    "stable_hash",
    "to_yaml",
]

DatasetName = Literal["fashion_mnist", "digits", "cifar10", "cifar100", "imagenet", "tensors"]
SplitName = Literal["train", "val", "test"]
ModelSourceKind = Literal["robustbench", "checkpoint", "builtin"]
Norm = Literal["Linf", "L2"]
AttackName = Literal["apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "standard"]
Device = Literal["auto", "cpu", "cuda"]

#: The components AutoAttack's "standard" version runs, in its order.
STANDARD_CASCADE: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")


def is_uri(value: str) -> bool:
    """``s3://bucket/x``, ``gs://...``, ``file:///...``: a location for pyarrow's filesystems, not a local path."""
    return "://" in value


def resolve_local_path(value: str | None) -> str | None:
    """A local path made absolute against the working directory of the process that reads the config.

    Ray Train workers and Tune trials run in folders of Ray's own (``/tmp/ray/session_*/artifacts/...``), so a
    relative path handed to them would point somewhere else; resolving every path once, when the config is
    validated, makes it mean the same thing in every Ray process (and under ``ray job submit --working-dir``
    it means the job's working directory, as Ray job users expect). URIs are left alone. Idempotent: a worker
    that validates the config again gets the same absolute path.
    """
    if value is None or is_uri(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


#: A local path or a URI; relative local paths are resolved against the reader's working directory.
LocalPath = Annotated[str, AfterValidator(resolve_local_path)]


class StrictConfig(BaseModel):
    """Base for all configs: unknown keys are errors (a misspelt key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictConfig):
    """Which samples to evaluate or train on.

    Sample ids are the row index in the dataset's own file (train file or test file), so they stay
    stable whatever slice is taken. ``train`` and ``val`` are the head and the tail of the training file
    (``val_size`` samples); ``test`` is the test file. A ``tensors`` file is a single partition: ``test``
    is all of it, ``train``/``val`` its head and tail.
    """

    name: DatasetName = Field("fashion_mnist", description="dataset")
    root: LocalPath | None = Field(None, description="dataset folder; default ~/.cache/rcat_ray/data")
    path: LocalPath | None = Field(None, description="the .pt/.npz file of a 'tensors' dataset")
    split: SplitName = Field("test", description="split: train, val (the held-out tail of the training files) or test")
    val_size: int | None = Field(None, ge=0, description="size of the val tail; default per dataset")
    offset: int = Field(0, ge=0, description="skip this many samples of the split")
    limit: int | None = Field(None, ge=1, description="take at most this many samples")

    @model_validator(mode="after")
    def _tensors_need_path(self) -> DataConfig:
        if self.name == "tensors" and not self.path:
            raise ValueError("data.path is required when data.name is 'tensors'")
        return self


class ModelConfig(StrictConfig):
    """Where a model comes from. ``name`` is the RobustBench name, or the architecture for builtins; for a
    checkpoint it is optional and defaults to the file's stem (what tables and reports show)."""

    source: ModelSourceKind = Field(..., description="where the model comes from: robustbench, checkpoint or builtin")
    name: str | None = Field(None, min_length=1, description="zoo name / architecture; checkpoint: file stem")
    label: str | None = Field(None, description="display name in tables and reports")
    path: LocalPath | None = Field(None, description="checkpoint file (source: checkpoint)")
    arch: str | None = Field(None, description="architecture of a plain state-dict checkpoint")
    arch_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of a built-in architecture"
    )
    model_dir: LocalPath = Field("models", validate_default=True, description="RobustBench model_dir")
    dataset: str | None = Field(None, description="RobustBench dataset; default from data.name")
    threat_model: str | None = Field(None, description="RobustBench threat model; default attack.norm")
    seed: int = Field(0, description="initialisation seed of an untrained builtin")

    @model_validator(mode="before")
    @classmethod
    def _name_from_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source") == "checkpoint" and not data.get("name") and data.get("path"):
            data = {**data, "name": Path(str(data["path"])).stem}
        return data

    @model_validator(mode="after")
    def _name_or_path(self) -> ModelConfig:
        if self.source == "checkpoint":
            if not self.path:
                raise ValueError("path is required when source is 'checkpoint'")
        elif self.name is None:
            what = "the RobustBench zoo name" if self.source == "robustbench" else "the architecture"
            raise ValueError(f"name ({what}) is required when source is '{self.source}'")
        return self

    @property
    def display_name(self) -> str:
        """A short human name for tables and plots: the label, else the name (a checkpoint's file stem)."""
        return self.label or self.name or ""


class AttackConfig(StrictConfig):
    """The threat model and the evaluation attack cascade (pyautoattack components).

    Attacks run as a cascade: each one only sees the samples still robust after the previous ones.
    ``standard`` expands to AutoAttack's standard cascade with its standard parameters.
    """

    norm: Norm = Field("Linf", description="threat model: Linf or L2")
    eps: float = Field(..., description="perturbation budget in [0,1]-pixel units")
    attacks: tuple[AttackName, ...] = Field(
        ("apgd-ce", "apgd-dlr"),
        description="the attack cascade, run in order ('standard': AutoAttack's standard version)",
    )
    n_iter: int = Field(50, ge=1, description="iterations of each APGD/FAB run")
    n_restarts: int = Field(1, ge=1, description="restarts per attack (APGD, FAB)")
    n_target_classes: int = Field(9, ge=1, description="targets for apgd-t / fab-t")
    square_queries: int = Field(5000, ge=1, description="queries of the Square attack")
    seed: int = Field(0, ge=0, description="seed of the attacks' random starts")
    seeds: tuple[int, ...] | None = Field(
        None,
        description="attack with each of these seeds (replaces seed): a sample is robust only when every seed "
        "failed, and the summary reports how often the seeds disagree (attack noise)",
    )
    robust_samples: int | None = Field(
        None, ge=1, description="attack only the first N samples of the split (clean metrics use all)"
    )

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, eps: float, info: ValidationInfo) -> float:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if info.data.get("norm", "Linf") == "Linf" and eps > 1:
            raise ValueError(f"eps must be at most 1 for Linf on [0,1] pixels, got {eps}")
        return eps

    @model_validator(mode="after")
    def _check(self) -> AttackConfig:
        if not self.attacks:
            raise ValueError("attacks must name at least one attack")
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks lists an attack twice: {list(self.attacks)}")
        if "standard" in self.attacks and len(self.attacks) > 1:
            raise ValueError("'standard' is a whole cascade; list it alone")
        seeds = self.seeds
        if seeds is not None and (len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0):
            raise ValueError(f"seeds must be two or more distinct non-negative seeds, got {list(seeds)}")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_seeds(self, handler: Any) -> dict[str, Any]:
        """``seeds`` appears only when set, so the dumps hashed into keys (tables, fine-tunes, sweeps) are the ones
        they were before it existed."""
        data = handler(self)
        if data.get("seeds", 0) is None:
            del data["seeds"]
        return data

    def single_seed(self, seed: int) -> AttackConfig:
        """This attack with one seed (what one per-model table is evaluated with)."""
        return self.model_copy(update={"seed": seed, "seeds": None})

    @property
    def cascade(self) -> tuple[str, ...]:
        """The attack components in the order they run."""
        return STANDARD_CASCADE if self.attacks == ("standard",) else tuple(self.attacks)


class WorkerCompute(StrictConfig):
    """The shape of every command's ``compute`` section: the Ray to run on and the workers the work is spread
    over. None of this changes the results (only where they are computed)."""

    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray")
    local_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    num_workers: int = Field(1, ge=1, description="Ray workers")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved per worker (a fraction shares a GPU)")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default cpus")

    @property
    def threads(self) -> int:
        """Torch intra-op threads per worker; fixed so results do not depend on the host."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


class ComputeConfig(WorkerCompute):
    """How an evaluation is spread over Ray: its actors, their device and how many chunks each holds."""

    num_workers: int = Field(1, ge=1, description="evaluation actors")
    device: Device = Field(
        "auto", description="device of the workers: auto (cuda when the worker has a GPU), cpu or cuda"
    )
    chunks_in_flight: int = Field(
        2, ge=1, description="chunks queued per evaluation actor: with 2, it reads the next chunk while attacking one"
    )


class BootstrapConfig(StrictConfig):
    """Paired bootstrap for the confidence intervals of every flip metric."""

    n_resamples: int = Field(1000, ge=10, description="bootstrap resamples")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    seed: int = Field(0, description="seed of the bootstrap")


class EvaluationSettings(StrictConfig):
    """What identifies an evaluation apart from the model: data, attack and chunking."""

    data: DataConfig = DataConfig()
    attack: AttackConfig
    chunk_size: int = Field(250, ge=1, description="samples per work unit (one attack batch)")
    store: LocalPath = Field("results", validate_default=True, description="result store: a path or a pyarrow URI")
    compute: ComputeConfig = ComputeConfig()
    max_new_chunks: int | None = Field(
        None, ge=1, description="stop after computing this many new chunks (time-boxed runs)"
    )
    save_adversarial: bool = Field(True, description="keep adversarial images for reports")


LossKind = Literal["rcat", "pct", "pcat", "at"]
TrainAttackKind = Literal["fgsm-rs", "pgd", "paper"]


class LossConfig(StrictConfig):
    """Which fine-tuning loss, with its weights (docs/contracts.md). Weights are checked against the loss kind."""

    kind: LossKind = Field("rcat", description="fine-tuning loss: rcat, pct, pcat or at")
    alpha: float = Field(
        0.5,
        description="weight alpha (RCAT: the new model's term, CE weighs 1 - alpha - beta; PCT/PCAT: the base weight)",
    )
    beta: float = Field(
        0.4,
        description="weight beta (RCAT: the old model's term; PCT/PCAT: the extra weight where the old model is right)",
    )
    normalisation: Literal["masked", "batch"] = Field("masked", description="RCAT: how L_new/L_old average")
    mask_source: Literal["on-the-fly", "cached"] = Field(
        "on-the-fly", description="RCAT m_old: from x* now, or the old model's stored robustness flags"
    )
    divergence: Literal["mse", "kl"] = Field("mse", description="PCT/PCAT distance")
    temperature: float = Field(100.0, gt=0, description="PCT/PCAT KL temperature")

    @model_validator(mode="after")
    def _weights(self) -> LossConfig:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.kind == "rcat" and self.alpha + self.beta > 1 + 1e-12:
            raise ValueError(
                f"RCAT needs alpha + beta <= 1, got alpha={self.alpha:g} + beta={self.beta:g} "
                f"= {self.alpha + self.beta:.10g}"
            )
        return self

    @property
    def tag(self) -> str:
        """A short name for tables: RCAT(0.5,0.4), PCT(1,2), AT."""
        if self.kind == "at":
            return "AT"
        return f"{self.kind.upper()}({self.alpha:g},{self.beta:g})"


class TrainAttackConfig(StrictConfig):
    """The attack crafted against the model being trained, inside every step (docs/contracts.md §1.3)."""

    kind: TrainAttackKind = Field("fgsm-rs", description="training attack: fgsm-rs, pgd or paper")
    eps: float = Field(..., gt=0, le=1, description="training attack budget, [0,1] pixel units")
    steps: int = Field(10, ge=1, description="PGD iterations")
    step_size: float | None = Field(None, gt=0, description="PGD step; default 2.5*eps/steps")


class OptimizerConfig(StrictConfig):
    """SGD (the paper: lr 1e-3, momentum 0.9, no weight decay) or AdamW, with an optional schedule."""

    name: Literal["sgd", "adamw"] = Field("sgd", description="optimizer: sgd or adamw")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule: constant or cosine"
    )
