"""The config of `rcat-ray finetune`: a fine-tune of the new model against the old one, fully described."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from rcat_ray.config import (
    AttackConfig,
    DataConfig,
    LocalPath,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    StrictConfig,
    TrainAttackConfig,
    WorkerCompute,
)


class ValidationConfig(StrictConfig):
    """Per-epoch validation flips of the model being trained against the old model (cheap attack)."""

    data: DataConfig | None = Field(None, description="default: the val split of the training data")
    samples: int = Field(1000, ge=1, description="validation samples attacked every epoch (the val split's head)")
    attack: AttackConfig | None = Field(None, description="default: APGD-CE, 10 iterations at the training eps")


class TrainComputeConfig(WorkerCompute):
    """How a fine-tune is spread over Ray Train: the same shape as every command's ``compute`` section, with 0
    workers meaning in-process training and GPUs asked for by ``gpus_per_worker`` (no ``use_gpu`` switch, so one
    key cannot contradict the other). Outside the run's identity: the worker count does not change the model."""

    num_workers: int = Field(1, ge=0, description="Ray Train workers (0 = in-process local mode)")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per Ray Train worker; above 0 the workers train on CUDA (a fraction shares a GPU)"
    )

    @property
    def use_gpu(self) -> bool:
        """Whether the workers train on CUDA (Ray Train's ``use_gpu``): they were given GPUs."""
        return self.gpus_per_worker > 0


class FinetuneConfig(StrictConfig):
    """``rcat-ray finetune``: fine-tune ``new`` towards ``old``-congruence on Ray Train."""

    old: ModelConfig = Field(description="the old model: the one whose correct, robust samples are kept")
    new: ModelConfig = Field(description="the new model: the starting point of the fine-tune")
    data: DataConfig = Field(DataConfig(split="train"), description="the training data")
    loss: LossConfig = Field(LossConfig(), description="the fine-tuning loss and its constraint weights")
    train_attack: TrainAttackConfig = Field(description="the attack that makes adversarial training inputs")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="the optimizer and its learning rate")
    epochs: int = Field(2, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, description="global batch, split evenly over the workers")
    seed: int = Field(0, description="seed of the shuffling, the attack's random starts and the augmentation")
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
        "this is shuffled within windows of row groups that fill half of it (core.finetune_epoch.ShuffleWindow)",
    )
    batchnorm: Literal["global", "per-worker"] = Field(
        "global",
        description="BatchNorm statistics when several workers train: 'global' takes them over the global batch "
        "(SyncBatchNorm on CUDA, an all-reduce on CPU), so any worker count trains the same model; 'per-worker' "
        "keeps each worker's own (faster, but the model then depends on the worker count)",
    )
    validation: ValidationConfig = Field(
        ValidationConfig(), description="the per-epoch validation flips (reported and read by ASHA, never trained on)"
    )
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
    compute: TrainComputeConfig = Field(
        TrainComputeConfig(), description="the Ray cluster and the Ray Train workers (never part of the identity)"
    )
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint")

    @model_validator(mode="after")
    def _cached_needs_table(self) -> FinetuneConfig:
        if self.output is not None and not self.output.endswith((".pt", ".pth")):
            raise ValueError(f"output must be a checkpoint path ending in .pt, got {self.output}")
        if self.loss.mask_source == "cached" and not self.cached_old_table:
            raise ValueError("loss.mask_source 'cached' needs cached_old_table (the old model's table key)")
        workers = self.compute.num_workers
        if workers > 1 and self.batch_size % workers:
            raise ValueError(
                f"batch_size {self.batch_size} (the global batch) does not split evenly over "
                f"{workers} workers; use a multiple of {workers}"
            )
        return self
