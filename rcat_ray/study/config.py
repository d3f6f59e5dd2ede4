"""The config of `rcat-ray study`: the paper's experiment over many model pairs, methods and seeds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from rcat_ray.config import (
    AttackConfig,
    BootstrapConfig,
    ComputeConfig,
    DataConfig,
    LocalPath,
    LossConfig,
    LossKind,
    ModelConfig,
    StrictConfig,
)
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.sweep.config import ChoiceValidationConfig
from rcat_ray.sweep.search_space import PAPER_PCT_BETAS, PAPER_RCAT_GRID

#: FinetuneConfig's settings that a study sets itself: per pair, method and seed, or from its own folders.
_SET_BY_THE_STUDY = ("old", "new", "loss", "name", "output", "out", "store", "storage")

#: Every fine-tuning setting of the study (FinetuneConfig's fields, less the ones the study sets); ``seed`` is the
#: seed of the grid's trials, the chosen weights are fine-tuned again with each of ``StudyConfig.seeds``.
StudyFinetune = create_model(  # one definition of the fields, so the two configs cannot drift apart
    "StudyFinetune",
    __base__=StrictConfig,
    __doc__="The fine-tune every (pair, method, weights) trial and every final run starts from.",
    **{k: (f.annotation, f) for k, f in FinetuneConfig.model_fields.items() if k not in _SET_BY_THE_STUDY},
)


class StudyPair(StrictConfig):
    """One old -> new update, by the names of ``StudyConfig.models``."""

    old: str = Field(min_length=1, description="the old model's name in `models`")
    new: str = Field(min_length=1, description="the new model's name in `models`")

    @property
    def name(self) -> str:
        return f"{self.old} -> {self.new}"


class StudyTest(StrictConfig):
    """Where and how the chosen fine-tunes are tested (the store and the evaluation actors are the study's)."""

    data: DataConfig = Field(description="the test data")
    attack: AttackConfig = Field(description="the test attack (the choice validation uses its eps by default)")
    chunk_size: int = Field(250, ge=1, description="samples per work unit")


#: ``pairs: paper-rule``: every old -> new pair whose new model is more accurate, clean and under attack.
PAPER_RULE = "paper-rule"


class StudyConfig(StrictConfig):
    """``rcat-ray study``: models, pairs, methods with their grids, seeds; chosen on validation, tested."""

    name: str = Field("study", min_length=1, description="the study's name (its sweeps' folders in the storage)")
    models: dict[str, ModelConfig] = Field(min_length=2, description="the models, by the names pairs use")
    pairs: Literal["paper-rule"] | tuple[StudyPair, ...] = Field(
        PAPER_RULE,
        description="the old -> new pairs, or 'paper-rule': every pair whose new model has higher clean and robust "
        "accuracy than the old one on the choice validation",
    )
    methods: tuple[LossKind, ...] = Field(
        ("at", "pct", "pcat", "rcat"), min_length=1, description="the methods; RCAT is the reference of the table"
    )
    rcat_grid: tuple[tuple[float, float], ...] = Field(PAPER_RCAT_GRID, min_length=1, description="RCAT (alpha, beta)")
    pct_betas: tuple[float, ...] = Field(PAPER_PCT_BETAS, min_length=1, description="PCT/PCAT beta values, alpha 1")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="seeds of the final fine-tunes")
    finetune: StudyFinetune = Field(description="the fine-tuning settings (data: the training data)")
    choice: ChoiceValidationConfig = Field(
        ChoiceValidationConfig(), description="the validation that chooses each method's weights per pair"
    )
    tolerance: float = Field(0.02, ge=0, description="choice: allowed drop of validation robust accuracy")
    test: StudyTest
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs of a trial that trains in its own process")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs of a trial that trains in its own process")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once (default: what the cluster holds)")
    compute: ComputeConfig = Field(ComputeConfig(), description="Ray (address) and the evaluation actors")
    store: LocalPath = Field("results", validate_default=True, description="result store of every evaluation")
    storage: LocalPath = Field("ray_results", validate_default=True, description="Ray Tune / Train storage path")
    out: LocalPath = Field("study-out", validate_default=True, description="folder of the study's tables and report")
    bootstrap: BootstrapConfig = BootstrapConfig()

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if "rcat" not in self.methods:
            raise ValueError("methods must include rcat: the study's differences are RCAT minus each other row")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods are listed twice: {list(self.methods)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds are listed twice: {list(self.seeds)}")
        if self.pairs != PAPER_RULE:
            if not self.pairs:
                raise ValueError("pairs is empty: list old -> new pairs or write 'paper-rule'")
            seen = set()
            for p in self.pairs:
                for side in (p.old, p.new):
                    if side not in self.models:
                        raise ValueError(f"pair {p.name}: no model named '{side}' in models ({', '.join(self.models)})")
                if p.old == p.new:
                    raise ValueError(f"pair {p.name} compares a model with itself")
                if (p.old, p.new) in seen:
                    raise ValueError(f"pair {p.name} is listed twice")
                seen.add((p.old, p.new))
        for a, b in self.rcat_grid:
            LossConfig(kind="rcat", alpha=a, beta=b)
        for b in self.pct_betas:
            LossConfig(kind="pct", alpha=1.0, beta=b)
        first = next(iter(self.models.values()))
        self.finetune_config(first, first, LossConfig())  # FinetuneConfig's own checks, before any compute
        return self

    def model(self, name: str) -> ModelConfig:
        """A model as tables show it: labelled with its name in the study unless it has a label."""
        m = self.models[name]
        return m if m.label else m.model_copy(update={"label": name})

    def finetune_config(
        self, old: ModelConfig, new: ModelConfig, loss: LossConfig, seed: int | None = None, **extra: Any
    ) -> FinetuneConfig:
        """The fine-tune of one pair with one loss (and seed): the study's settings with its store and storage."""
        settings = self.finetune.model_dump()
        settings.update(store=self.store, storage=f"{self.storage}/train", out=f"{self.out}/finetuned", **extra)
        if seed is not None:
            settings["seed"] = seed
        return FinetuneConfig(old=old, new=new, loss=loss, **settings)
