"""What a fine-tune is trained from, checked: the parents, the cached old-model mask and their fingerprints.

The driver checks them once (:func:`rcat_ray.finetune.run.check_finetune_inputs`) and sends the fingerprints
to the workers; every worker checks what it loads against them, so a run never trains from other parents or
data than its identity (:mod:`rcat_ray.finetune.identity`) names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rcat_ray.core.finetune_epoch import CachedMask
from rcat_ray.core.models import LoadedModel
from rcat_ray.core.samples import SampleSet
from rcat_ray.errors import FinetuneInputError, ModelFingerprintError, RunIdentityError
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.identity import FinetuneIdentity, IdentityInputs, finetune_identity, model_identity
from rcat_ray.finetune.sets import SampleSets, training_ids
from rcat_ray.store.result_store import ResultStore, table_from_bytes

if TYPE_CHECKING:
    from rcat_ray.finetune.checkpoints import FinetuneOutcome


@dataclass
class Parents:
    """The old and new models as loaded and checked in the driver, with the data's input shape, where the
    prepared training and validation sets are, and the fingerprints the run's identity is made of."""

    old: LoadedModel
    new: LoadedModel
    input_shape: tuple[int, int, int]
    samples: SampleSets | None = None
    inputs: IdentityInputs | None = None
    finished: FinetuneOutcome | None = None  # the checked config's fine-tune, already at its output path

    def identity(self, cfg: FinetuneConfig) -> FinetuneIdentity:
        """The identity of fine-tuning ``cfg`` from these parents and data."""
        if self.inputs is None:
            raise ValueError("these parents were not checked by check_finetune_inputs (no fingerprints)")
        return finetune_identity(cfg, self.inputs)


def cached_mask(cfg: FinetuneConfig, train_set: SampleSet, old_fingerprint: str) -> tuple[CachedMask, str] | None:
    """The old model's stored robustness flags and the sha256 of the table they come from (part of the run's
    identity), or None without ``mask_source: cached``.

    The table is read through the checksum its manifest records (a damaged one is a StoreError), and refused
    (FinetuneInputError) unless its manifest names the old model's weights and this training selection, and
    every training sample has a flag: a null flag means "never attacked", not "not robust".
    """
    if cfg.loss.mask_source != "cached":
        return None
    store, folder = ResultStore(cfg.store), f"tables/{cfg.cached_old_table}"
    manifest = store.read_manifest(f"{folder}/manifest.json")
    if manifest is None:
        raise FinetuneInputError(
            f"cached_old_table {cfg.cached_old_table}: no finished table at {store.path(folder)}; evaluate the old "
            "model on the training selection first (rcat-ray evaluate with the same data settings)"
        )
    table = table_from_bytes(store.read_verified(folder, "table.parquet", manifest))
    what = f"cached_old_table {cfg.cached_old_table}"
    if manifest.get("model_fingerprint") != old_fingerprint:
        raise FinetuneInputError(
            f"{what} is a table of the model with fingerprint {manifest.get('model_fingerprint')}, but the old "
            f"model has {old_fingerprint}: its flags are not the old model's"
        )
    data, train = manifest.get("data") or {}, train_set.describe()
    if data.get("fingerprint") != train["fingerprint"] and not _same_source((manifest.get("settings") or {}), cfg):
        raise FinetuneInputError(
            f"{what} was evaluated on {data.get('dataset')} {data.get('split')} ({data.get('n_samples')} samples, "
            f"fingerprint {data.get('fingerprint')}), not on the training selection ({train['dataset']} "
            f"{train['split']}, {train['n_samples']} samples, fingerprint {train['fingerprint']}) nor on a larger "
            "selection of the same files; evaluate the old model with the fine-tune's data settings"
        )
    robust = table.column("robust")
    flags = robust.fill_null(False).to_numpy(zero_copy_only=False).astype("int8")
    flags[robust.is_null().to_numpy(zero_copy_only=False)] = -1
    ids = torch.tensor(table.column("sample_id").to_numpy(zero_copy_only=False))
    mask = CachedMask(ids, torch.as_tensor(flags))
    mask.check(training_ids(train_set), f"the old model's table {cfg.cached_old_table}")
    return mask, manifest["files"]["table.parquet"]["sha256"]


def _same_source(settings: dict[str, Any], cfg: FinetuneConfig) -> bool:
    """Whether a table's recorded data settings select from the same files and split as the training data (another
    offset or limit only): then its rows are the training rows, and covering their ids is enough."""
    recorded = settings.get("data")
    if not isinstance(recorded, dict):
        return False
    keys = ("name", "root", "path", "split", "val_size")
    ours = cfg.data.model_dump(mode="json")
    return all(recorded.get(k) == ours.get(k) for k in keys)


def identity_inputs(
    old: LoadedModel, new: LoadedModel, train_set: SampleSet, cached: tuple[CachedMask, str] | None
) -> IdentityInputs:
    """The fingerprints of what a fine-tune is trained from (see :mod:`rcat_ray.finetune.identity`)."""
    return IdentityInputs(
        old=model_identity(old.fingerprint, old.source),
        new=model_identity(new.fingerprint, new.source),
        training_set=train_set.info.fingerprint,
        training_rows=len(train_set),
        cached_old_table=cached[1] if cached else None,
    )


def check_same_inputs(cfg: FinetuneConfig, expected: IdentityInputs, here: IdentityInputs) -> None:
    """Stop a worker whose parents or training set are not the ones the driver checked: the run would train
    something else than what its identity and manifest name."""
    for role in ("old", "new"):
        want, got = getattr(expected, role)["fingerprint"], getattr(here, role)["fingerprint"]
        if want != got:
            source = getattr(cfg, role)
            where = source.path or source.name
            raise ModelFingerprintError(
                f"the {role} model loaded on this worker from {where} has weights with fingerprint {got}, but the run "
                f"was checked with {want}: the source changed during the run (or this node sees another copy of it); "
                "make it the same on every node and run again"
            )
    if expected != here:
        raise RunIdentityError(
            f"this worker's training inputs differ from the driver's (training set {here.training_set[:16]} vs "
            f"{expected.training_set[:16]}, cached table {here.cached_old_table} vs {expected.cached_old_table}): "
            "the sample set or the cached table changed during the run; run again"
        )
