"""Typed, validated run configurations, read from YAML and written back next to results.

Every knob of a run lives here so that a run is fully described by one object: the CLI and the job
scripts only build these objects, and the result store hashes them into cache keys. Validation happens
here, before any model is loaded or any attack runs, and a bad field is named in the error.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

DatasetName = Literal["fashion_mnist", "digits", "cifar10", "cifar100", "imagenet", "tensors"]
SplitName = Literal["train", "val", "test"]
ModelSourceKind = Literal["robustbench", "checkpoint", "builtin"]
Norm = Literal["Linf", "L2"]
AttackName = Literal["apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "standard"]
Device = Literal["auto", "cpu", "cuda"]

#: The components AutoAttack's "standard" version runs, in its order.
STANDARD_CASCADE: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending field."""


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


class _Strict(BaseModel):
    """Base for all configs: unknown keys are errors (a misspelt key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Which samples to evaluate or train on.

    Sample ids are the row index in the dataset's own file (train file or test file), so they stay
    stable whatever slice is taken. ``train`` and ``val`` are the head and the tail of the training file
    (``val_size`` samples); ``test`` is the test file. A ``tensors`` file is a single partition: ``test``
    is all of it, ``train``/``val`` its head and tail.
    """

    name: DatasetName = "fashion_mnist"
    root: LocalPath | None = Field(None, description="dataset folder; default ~/.cache/rcat_ray/data")
    path: LocalPath | None = Field(None, description="the .pt/.npz file of a 'tensors' dataset")
    split: SplitName = "test"
    val_size: int | None = Field(None, ge=0, description="size of the val tail; default per dataset")
    offset: int = Field(0, ge=0, description="skip this many samples of the split")
    limit: int | None = Field(None, ge=1, description="take at most this many samples")

    @model_validator(mode="after")
    def _tensors_need_path(self) -> DataConfig:
        if self.name == "tensors" and not self.path:
            raise ValueError("data.path is required when data.name is 'tensors'")
        return self


class ModelConfig(_Strict):
    """Where a model comes from. ``name`` is the RobustBench name, or the architecture for builtins; for a
    checkpoint it is optional and defaults to the file's stem (what tables and reports show)."""

    source: ModelSourceKind
    name: str | None = Field(None, min_length=1, description="zoo name / architecture; checkpoint: file stem")
    label: str | None = Field(None, description="display name in tables and reports")
    path: LocalPath | None = Field(None, description="checkpoint file (source: checkpoint)")
    arch: str | None = Field(None, description="architecture of a plain state-dict checkpoint")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
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


class AttackConfig(_Strict):
    """The threat model and the evaluation attack cascade (pyautoattack components).

    Attacks run as a cascade: each one only sees the samples still robust after the previous ones.
    ``standard`` expands to AutoAttack's standard cascade with its standard parameters.
    """

    norm: Norm = "Linf"
    eps: float = Field(..., description="perturbation budget in [0,1]-pixel units")
    attacks: tuple[AttackName, ...] = ("apgd-ce", "apgd-dlr")
    n_iter: int = Field(50, ge=1, description="iterations of each APGD/FAB run")
    n_restarts: int = Field(1, ge=1)
    n_target_classes: int = Field(9, ge=1, description="targets for apgd-t / fab-t")
    square_queries: int = Field(5000, ge=1)
    seed: int = Field(0, ge=0)
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
        return self

    @property
    def cascade(self) -> tuple[str, ...]:
        """The attack components in the order they run."""
        return STANDARD_CASCADE if self.attacks == ("standard",) else tuple(self.attacks)


class ComputeConfig(_Strict):
    """How the work is spread over Ray. None of this changes the results (only where they are computed)."""

    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray")
    local_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    num_workers: int = Field(1, ge=1, description="evaluation actors")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default cpus")
    device: Device = "auto"
    chunks_in_flight: int = Field(
        2, ge=1, description="chunks queued per evaluation actor: with 2, it reads the next chunk while attacking one"
    )

    @property
    def threads(self) -> int:
        """Torch intra-op threads per worker; fixed so results do not depend on the host."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


class BootstrapConfig(_Strict):
    """Paired bootstrap for the confidence intervals of every flip metric."""

    n_resamples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class EvaluationSettings(_Strict):
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


class EvaluateConfig(EvaluationSettings):
    """``rcat-ray evaluate``: attack each model once and store its per-model table."""

    models: tuple[ModelConfig, ...] = Field(..., min_length=1)


class CompareConfig(EvaluationSettings):
    """``rcat-ray compare``: evaluate what is not cached, then compute flips of old -> new."""

    old: ModelConfig
    new: ModelConfig
    bootstrap: BootstrapConfig = BootstrapConfig()
    report: LocalPath | None = Field(None, description="also write the HTML report into this folder")


C = TypeVar("C", bound=BaseModel)


def _format_validation_error(err: ValidationError, cls: type[BaseModel], flags: dict[str, str] | None = None) -> str:
    """One line per bad field; a field that has a command-line flag is named by its flag first."""
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        flag = (flags or {}).get(where)
        if item["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(item["loc"], cls)
        if item["type"] == "missing":
            lines.append(f"  {flag} is required (config key {where})" if flag else f"  {where} is required")
        else:
            lines.append(f"  {flag} ({where}): {msg}" if flag else f"  {where}: {msg}")
    return f"invalid {cls.__name__}:\n" + "\n".join(lines)


def _suggest(loc: tuple, cls: type[BaseModel]) -> str:
    """Find the intended key of a misspelt one by walking the config classes along the error path."""
    model: Any = cls
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            args = getattr(ann, "__args__", ())
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_config(cls: type[C], data: dict[str, Any], *, flags: dict[str, str] | None = None) -> C:
    """Validate a plain dict into ``cls``, raising ConfigError with every bad field named.

    ``flags`` maps dotted config keys to the command-line flags that set them, so a user who typed flags
    reads ``--eps is required`` rather than a config key they never wrote.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, cls, flags)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or a non-mapping document."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with p.open() as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not text (UTF-8 YAML expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Overlay ``override`` on ``base`` key by key (flags over a YAML file)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, written next to results so a run can be repeated."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash that only depends on content (sorted keys, JSON form): the basis of cache keys."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


# ----------------------------------------------------------------------------------------------------
# Fine-tuning (RCAT and its baselines)

LossKind = Literal["rcat", "pct", "pcat", "at"]
TrainAttackKind = Literal["fgsm-rs", "pgd", "paper"]


class LossConfig(_Strict):
    """Which fine-tuning loss, with its weights (DESIGN §1.2). Weights are checked against the loss kind."""

    kind: LossKind = "rcat"
    alpha: float = 0.5
    beta: float = 0.4
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


class TrainAttackConfig(_Strict):
    """The attack crafted against the model being trained, inside every step (DESIGN §1.3)."""

    kind: TrainAttackKind = "fgsm-rs"
    eps: float = Field(..., gt=0, le=1)
    steps: int = Field(10, ge=1, description="PGD iterations")
    step_size: float | None = Field(None, gt=0, description="PGD step; default 2.5*eps/steps")


class OptimizerConfig(_Strict):
    """SGD (the paper: lr 1e-3, momentum 0.9, no weight decay) or AdamW, with an optional schedule."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"


class ValidationConfig(_Strict):
    """Per-epoch validation flips of the model being trained against the old model (cheap attack)."""

    data: DataConfig | None = Field(None, description="default: the val split of the training data")
    samples: int = Field(1000, ge=1)
    attack: AttackConfig | None = Field(None, description="default: APGD-CE, 10 iterations at the training eps")


class FinetuneConfig(_Strict):
    """``rcat-ray finetune``: fine-tune ``new`` towards ``old``-congruence on Ray Train."""

    old: ModelConfig
    new: ModelConfig
    data: DataConfig = DataConfig(split="train")
    loss: LossConfig = LossConfig()
    train_attack: TrainAttackConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch, split evenly over the workers")
    seed: int = 0
    mixed_precision: bool = Field(True, description="autocast + grad scaling on GPU (ignored on CPU)")
    augment: bool = Field(
        False,
        description="standard augmentation on the CPU side: random crop (padding 4) + horizontal flip for images "
        "up to 64 px; random resized crop + flip for larger (ImageNet) ones",
    )
    read_cache_mib: float = Field(
        256.0,  # a float, as a parsed value is: the run name hashes the dumped config on the driver and workers
        gt=0,
        description="MiB of stored row groups a worker keeps decoded between batches; a training set larger than "
        "this is shuffled within windows of row groups that fill half of it (rcat_ray.core.finetune.ShuffleWindow)",
    )
    batchnorm: Literal["global", "per-worker"] = Field(
        "global",
        description="BatchNorm statistics when several workers train: 'global' takes them over the global batch "
        "(SyncBatchNorm on CUDA, an all-reduce on CPU), so any worker count trains the same model; 'per-worker' "
        "keeps each worker's own (faster, but the model then depends on the worker count)",
    )
    validation: ValidationConfig = ValidationConfig()
    cached_old_table: str | None = Field(
        None, description="store key of the old model's table on the training split (mask_source: cached)"
    )
    out: LocalPath = Field(
        "finetuned", validate_default=True, description="folder for the final checkpoint and its manifest"
    )
    name: str | None = Field(
        None,
        description="label of the output files, <out>/<name>-<identity>.pt: the identity (a hash of the parents' "
        "weights, the training data and every training setting) keeps runs with other settings apart; default "
        "finetune-<loss>-<identity>",
    )
    output: LocalPath | None = Field(
        None,
        description="exact path of the final checkpoint (.pt; its manifest beside it as .json), instead of <out>/...; "
        "a different fine-tune already there stops the command (exit 2), the same one is reused",
    )
    storage: LocalPath = Field(
        "ray_results", validate_default=True, description="Ray Train storage path (shared storage on a cluster)"
    )
    store: LocalPath = Field("results", validate_default=True, description="result store (cached masks, evaluations)")
    num_workers: int = Field(1, ge=0, description="Ray Train workers (0 = in-process local mode)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1)
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint")
    address: str | None = None
    fail_once_at_epoch: int | None = Field(
        None, ge=0, description="testing aid: rank 1 (or 0) raises once at the start of this epoch"
    )

    @model_validator(mode="after")
    def _cached_needs_table(self) -> FinetuneConfig:
        if self.output is not None and not self.output.endswith((".pt", ".pth")):
            raise ValueError(f"output must be a checkpoint path ending in .pt, got {self.output}")
        if self.loss.mask_source == "cached" and not self.cached_old_table:
            raise ValueError("loss.mask_source 'cached' needs cached_old_table (the old model's table key)")
        if self.num_workers > 1 and self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} (the global batch) does not split evenly over "
                f"{self.num_workers} workers; use a multiple of {self.num_workers}"
            )
        return self


class TableEntry(_Strict):
    """One row of a pair's table: a label (e.g. ``RCAT(0.5,0.4)``) and the model to evaluate."""

    label: str | None = Field(None, min_length=1, description="row label (default: the model's display name)")
    model: ModelConfig

    @property
    def display_name(self) -> str:
        return self.label or self.model.display_name


class TablePair(_Strict):
    """An old -> new update and the fine-tuned versions of ``new`` to compare against ``old``."""

    name: str = Field(..., min_length=1)
    old: ModelConfig
    new: ModelConfig
    finetuned: tuple[TableEntry, ...] = ()
    reference: str | None = Field(None, description="row whose paired differences are shown (default: RCAT)")


class TableConfig(EvaluationSettings):
    """``rcat-ray table``: the paper-style table of one or more pairs (every model evaluated once, cached)."""

    pairs: tuple[TablePair, ...] = Field(..., min_length=1)
    bootstrap: BootstrapConfig = BootstrapConfig()
    out: LocalPath = Field("table", validate_default=True, description="folder for table.md, table.tex, table.csv")


# ----------------------------------------------------------------------------------------------------
# Sweeps (Ray Tune)


class SweepSpace(_Strict):
    """What a sweep varies. ``grid`` mode uses the paper's grids for ``losses``; ``search`` mode samples."""

    losses: tuple[LossKind, ...] = Field(("rcat",), min_length=1)
    alpha_range: tuple[float, float] = Field((0.0, 1.0), description="RCAT alpha range (search mode)")
    beta_range: tuple[float, float] = Field((0.0, 1.0), description="RCAT beta range (search mode)")
    pct_beta_range: tuple[float, float] = Field((0.5, 10.0), description="PCT/PCAT beta range, alpha = 1")
    train_eps: tuple[float, ...] = Field((), description="training eps choices (default: the base's)")
    lr: tuple[float, ...] = Field((), description="learning-rate choices (default: the base's)")
    epochs: tuple[int, ...] = Field((), description="epoch choices (default: the base's)")


class AshaConfig(_Strict):
    """Early stopping of trials on the per-epoch validation S-NFR."""

    enabled: bool = True
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)


class SelectionValidationConfig(_Strict):
    """How the finished trials are judged for the selection rule: the test-strength attack on a validation set
    large enough for confidence intervals. The cheap per-epoch validation only drives progress and ASHA: a weak
    attack rewarded a model that the strong test attack then broke."""

    enabled: bool = True
    samples: int = Field(2000, ge=1, description="validation samples (the val split's head)")
    attack: AttackConfig | None = Field(
        None,
        description="default: APGD-CE + APGD-DLR, 50 iterations, at the test eps when the sweep has test settings, "
        "else at the base's training eps",
    )
    chunk_size: int = Field(250, ge=1)
    compute: ComputeConfig = ComputeConfig()


class SweepConfig(_Strict):
    """``rcat-ray sweep``: search the constraint weights (and eps, lr, epochs) of fine-tuning with Ray Tune."""

    base: FinetuneConfig
    mode: Literal["grid", "search"] = "grid"
    algorithm: Literal["random", "optuna"] = "random"
    num_samples: int = Field(8, ge=1, description="trials in search mode")
    seed: int = 0
    space: SweepSpace = SweepSpace()
    asha: AshaConfig = AshaConfig()
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(None, ge=1, description="default: what the cluster's resources allow")
    tolerance: float = Field(0.02, ge=0, description="selection: allowed drop of validation robust accuracy")
    selection: SelectionValidationConfig = SelectionValidationConfig()
    name: str = Field("sweep", min_length=1)
    storage: LocalPath = Field("ray_results", validate_default=True, description="Ray Tune storage path")
    out: LocalPath = Field(
        "sweep-out", validate_default=True, description="folder for trials.parquet, best.yaml, plots and the report"
    )
    address: str | None = Field(None, description="Ray address (default: a local Ray)")
    test: EvaluationSettings | None = Field(None, description="evaluate the chosen model on this (test) data")
    bootstrap: BootstrapConfig = BootstrapConfig()


# ----------------------------------------------------------------------------------------------------
# Nightly regression gate


class ClassGate(_Strict):
    """Gates for one class (by index), judged on that class's per-class metrics."""

    class_index: int = Field(..., ge=0, alias="class")
    max_nfr: float | None = Field(None, ge=0, le=1)
    max_r_nfr: float | None = Field(None, ge=0, le=1)
    max_s_nfr: float | None = Field(None, ge=0, le=1)
    min_acc: float | None = Field(None, ge=0, le=1)
    min_rob_acc: float | None = Field(None, ge=0, le=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GatesConfig(_Strict):
    """Thresholds (fractions, not %) a candidate must meet. A max gate fails only when the lower CI bound is
    above it, a min gate only when the upper CI bound is below it (``judge_on: ci``): a gate fails when the
    evidence says so. ``judge_on: value`` compares the point estimate instead."""

    max_nfr: float | None = Field(None, ge=0, le=1)
    max_r_nfr: float | None = Field(None, ge=0, le=1)
    max_s_nfr: float | None = Field(None, ge=0, le=1)
    min_acc: float | None = Field(None, ge=0, le=1)
    min_rob_acc: float | None = Field(None, ge=0, le=1)
    judge_on: Literal["ci", "value"] = "ci"
    per_class: tuple[ClassGate, ...] = ()


class NotifyConfig(_Strict):
    """Where the verdict goes besides the exit code and the verdict file."""

    kind: Literal["stdout", "file", "webhook"] = "stdout"
    path: LocalPath | None = Field(None, description="file notifier: append one JSON line per night")
    url: str | None = Field(None, description="webhook notifier: POST the verdict as JSON")
    timeout_s: float = Field(10.0, gt=0)

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
