"""The data a fine-tune reads: the training and validation sample sets in the result store, and the parents
shaped by them.

The driver prepares both sets once (decoded into chunk-aligned Parquet, reused by every later run) and sends
only their two locations to the workers; each worker then reads its own rows of the training set (see
docs/architecture.md, the data path).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from rcat_ray.config import AttackConfig, DataConfig
from rcat_ray.core.models import LoadedModel, load_model
from rcat_ray.core.samples import SampleSet, samples_in_store
from rcat_ray.finetune.config import FinetuneConfig

#: Rows per row group of a training set prepared for fine-tuning, where the default (256) is too coarse: a set
#: larger than the read cache is shuffled within windows of whole row groups (``ShuffleWindow``), and the
#: finer the groups, the more of them a window mixes: at 224 px a 128 MiB window holds 3 groups of 256 rows
#: (38 MB each; an ImageFolder's neighbouring rows are mostly one class) or 55 groups of 16 (2.4 MB). The small
#: datasets keep 256 (a CIFAR group is 786 kB, and their sets fit the read cache). Only the layout differs:
#: the set, its fingerprint and the tensors read are the same, and an existing set is reused as it is.
TRAIN_ROWS_PER_GROUP = {"imagenet": 16}
DEFAULT_ROWS_PER_GROUP = 256


@dataclass(frozen=True)
class SampleSets:
    """Where the prepared training and validation sets are: locations in the result store, valid on every
    node. This (two strings), not the samples, is what the loop config carries to the workers."""

    train: str
    validation: str

    def to_json(self) -> dict[str, str]:
        return {"train": self.train, "validation": self.validation}

    @classmethod
    def from_json(cls, d: dict[str, str]) -> SampleSets:
        return cls(train=d["train"], validation=d["validation"])


def training_samples(cfg: FinetuneConfig) -> SampleSet:
    """The training selection's sample set in the store, prepared on first use (see TRAIN_ROWS_PER_GROUP)."""
    rows = TRAIN_ROWS_PER_GROUP.get(cfg.data.name, DEFAULT_ROWS_PER_GROUP)
    return samples_in_store(cfg.store, cfg.data, rows_per_group=rows)


def validation_data(cfg: FinetuneConfig) -> DataConfig:
    """The validation subset's selection: the configured one, or the head of the training data's val split."""
    data = cfg.validation.data or cfg.data.model_copy(update={"split": "val", "offset": 0, "limit": None})
    return data.model_copy(update={"limit": min(cfg.validation.samples, data.limit or cfg.validation.samples)})


def validation_setup(cfg: FinetuneConfig) -> tuple[SampleSet, AttackConfig]:
    """The validation subset (a sample set in the store, prepared on first use) and the cheap attack used
    every epoch."""
    return samples_in_store(cfg.store, validation_data(cfg)), validation_attack(cfg)


def prepare_sample_sets(cfg: FinetuneConfig) -> SampleSets:
    """Prepare (or find) the training and validation sets in the store; returns their locations."""
    return SampleSets(training_samples(cfg).uri, validation_setup(cfg)[0].uri)


def validation_attack(cfg: FinetuneConfig) -> AttackConfig:
    """The cheap attack of the per-epoch validation: the configured one, or APGD-CE, 10 iterations."""
    return cfg.validation.attack or AttackConfig(eps=cfg.train_attack.eps, attacks=("apgd-ce",), n_iter=10)


def load_parents(cfg: FinetuneConfig, samples: SampleSet) -> tuple[LoadedModel, LoadedModel]:
    """The old and new models, shaped by the set's description (no image is read)."""
    kw = {"num_classes": samples.info.num_classes, "input_shape": samples.info.shape, "data_name": cfg.data.name}
    return load_model(cfg.old, **kw), load_model(cfg.new, **kw)


def training_ids(samples: SampleSet) -> torch.Tensor:
    """The set's sample ids in position order, without reading any image.

    Sample ids are strictly increasing in a set, so when the first and last id span exactly its row count
    they are that range (every selection of the built-in datasets); otherwise the ``sample_id`` column is
    read alone (8 bytes a row).
    """
    info = samples.info
    lo, hi = info.sample_id_min, info.sample_id_max
    if lo is not None and hi is not None and hi - lo + 1 == info.num_rows:
        return torch.arange(lo, hi + 1, dtype=torch.int64)
    columns = []
    for path in samples.files:
        with samples.filesystem.open_input_file(path) as f:
            columns.append(pq.ParquetFile(f).read(columns=["sample_id"]).column("sample_id").to_numpy())
    return torch.from_numpy(np.concatenate(columns).astype(np.int64))
