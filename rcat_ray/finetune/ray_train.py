"""Ray Train fine-tuning: TorchTrainer (DDP; gloo on CPU, nccl on GPU) around the core epoch function.

Data plane. Before Ray starts, the driver prepares the training selection and the validation subset as
sample sets in the result store (:func:`rcat_ray.core.samples.samples_in_store`: decoded once into
chunk-aligned Parquet, reused by every later run; the store is the one place every node reaches) and reads
two rows of the training set to check the models against it; it never holds the training split. The loop
config carries only the config and the two set locations. Each worker opens the training set and reads only
its own rows: its contiguous share of every global batch
(:class:`rcat_ray.core.finetune_epoch.GlobalBatchSampler`: one permutation per epoch from (seed, epoch),
``batch_size`` is the global batch, the attack's random start and the augmentation are drawn per global
batch), asked for by position through ``SampleSet.iter_batches`` with a bounded LRU of decoded row groups
(:class:`rcat_ray.core.finetune_epoch.StreamedGlobalBatches`). So no worker holds the training set, and 1 and N
workers take the same optimizer steps on the same samples and, for losses that are batch means, train the
same model. Rank 0 reads the validation set chunk by chunk each epoch. Each worker loads the two parent
models from their sources (paths or RobustBench names, valid on every node) itself.

Why not ``TorchTrainer(datasets=...)`` and ``get_dataset_shard``: Ray Train hands each worker a
``streaming_split`` of the dataset, whose coordinator gives the blocks of one execution to whichever
worker asks next. Which rows a worker trains on then depends on timing and on the worker count, so the same
config would train a different model on 1 and on 2 workers (and on a rerun), which the global-batch
contract forbids. The deterministic alternatives do not stream: excluding the dataset from
``DataConfig(datasets_to_split=...)`` gives every worker the whole dataset to filter (every worker reads
everything), and ``Dataset.split`` or a per-epoch ``random_shuffle`` materialises the whole set in the
object store. The rows a worker needs are a known function of (seed, epoch, rank, world size), so the
worker reads exactly those rows from the prepared Parquet set itself: data goes from storage straight to
the worker that trains on it, and the order is seeded (reproducible for a given worker count, and the
global batches are the same for any worker count).

Every epoch, rank 0 measures validation flips against the old model and saves a checkpoint (model,
optimizer, scheduler, scaler, epoch, RNG states, history with each rank's node, pid and rows read); a
restarted worker group resumes from the latest one at the epoch boundary (``FailureConfig``): the
permutation, random starts and augmentation of an epoch depend only on (seed, epoch), so a resumed run
trains as one that never stopped. After ``fit`` the driver writes the final model as a self-describing
checkpoint with a manifest naming both parents' fingerprints, so the flip engine loads it like any other
checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rcat_ray.config import AttackConfig, DataConfig, parse_config
from rcat_ray.core.batchnorm import global_batchnorm, has_batchnorm
from rcat_ray.core.finetune_epoch import (
    CachedMask,
    GlobalBatchSampler,
    StreamedGlobalBatches,
    finetune_epoch,
    frozen_copy,
    make_optimizer,
    shuffle_block_rows,
    shuffle_window,
)
from rcat_ray.core.models import LoadedModel, checkpoint_metadata, load_model, save_checkpoint
from rcat_ray.core.progress import Progress
from rcat_ray.core.samples import SampleSet, open_samples, samples_in_store
from rcat_ray.core.validation import per_model_table, validation_flips
from rcat_ray.errors import FinetuneInputError, ModelError, ModelFingerprintError, RunIdentityError
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.identity import FinetuneIdentity, IdentityInputs, finetune_identity, model_identity
from rcat_ray.runtime import quiet
from rcat_ray.runtime.allocator import retain_freed_heap
from rcat_ray.store.result_store import ResultStore, now_iso, package_versions, table_from_bytes, write_file_atomic

STATE_FILE = "state.pt"
progress_log = logging.getLogger("rcat_ray.core.progress")


@dataclass
class FinetuneOutcome:
    """Where the fine-tuned model is and what the run reported."""

    checkpoint: Path
    manifest: Path
    fingerprint: str
    history: list[dict[str, Any]]
    reused: bool = False  # found at the output path with the same identity: nothing was trained


#: Rows per row group of a training set prepared for fine-tuning, where the default (256) is too coarse: a set
#: larger than the read cache is shuffled within windows of whole row groups (``ShuffleWindow``), and the
#: finer the groups, the more of them a window mixes: at 224 px a 128 MiB window holds 3 groups of 256 rows
#: (38 MB each; an ImageFolder's neighbouring rows are mostly one class) or 55 groups of 16 (2.4 MB). The small
#: datasets keep 256 (a CIFAR group is 786 kB, and their sets fit the read cache). Only the layout differs:
#: the set, its fingerprint and the tensors read are the same, and an existing set is reused as it is.
TRAIN_ROWS_PER_GROUP = {"imagenet": 16}
DEFAULT_ROWS_PER_GROUP = 256
#: Testing aid (multi-node tests): a folder; every worker waits at the start of each epoch after the first
#: until ``open-e<epoch>`` exists there, after writing ``arrived-e<epoch>-r<rank>-p<pid>`` (its node id, host
#: and pid as JSON), so a test can act (remove a node) while an epoch is known to be running.
TEST_GATE_ENV = "RCAT_RAY_TEST_EPOCH_GATE"


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
    return samples_in_store(cfg.store, validation_data(cfg)), _validation_attack(cfg)


def prepare_sample_sets(cfg: FinetuneConfig) -> SampleSets:
    """Prepare (or find) the training and validation sets in the store; returns their locations."""
    return SampleSets(training_samples(cfg).uri, validation_setup(cfg)[0].uri)


def _load_parents(cfg: FinetuneConfig, samples: SampleSet) -> tuple[LoadedModel, LoadedModel]:
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


def _cached_mask(cfg: FinetuneConfig, train_set: SampleSet, old_fingerprint: str) -> tuple[CachedMask, str] | None:
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


class TrainSession:
    """The loop's view of Ray Train: ranks, device, DDP preparation, checkpoints and reports."""

    def __init__(self, cfg: FinetuneConfig):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
        # local mode keeps only the checkpoint's path, so its folder must outlive report()
        self.persistent_checkpoints = cfg.num_workers == 0

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    def get_checkpoint(self) -> Any:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ck = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ck)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker loop that Ray Train runs (also runs in-process with ``num_workers=0``).

    ``loop_config``: the config (JSON), the driver's pid, ``samples`` (:class:`SampleSets` as JSON): where the
    prepared sets are, and ``inputs`` (:class:`IdentityInputs` as JSON): the fingerprints the driver checked,
    which every worker checks again on what it loads. Without ``samples`` the worker finds (or prepares) the
    sets in the store itself.
    """
    cfg = parse_config(FinetuneConfig, loop_config["finetune"])
    if loop_config.get("driver_pid") != os.getpid():
        _worker_progress_logging()
    sets = SampleSets.from_json(loop_config["samples"]) if loop_config.get("samples") else None
    inputs = IdentityInputs.from_json(loop_config["inputs"]) if loop_config.get("inputs") else None
    return finetune_loop(cfg, TrainSession(cfg), sets, inputs)


def _worker_progress_logging() -> None:
    """In a Ray worker process nobody configured logging, so progress lines (INFO) would be dropped: send
    them to the worker's stderr, which Ray forwards to the driver (``log_to_driver``) and its log files."""
    if progress_log.level == logging.NOTSET:
        progress_log.setLevel(logging.INFO)
    if not progress_log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress_log.addHandler(handler)


def _global_stats(stats: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """The epoch's loss over every worker's samples (a sum over the group), so that the reported loss is
    that of the global batches, whatever the number of workers."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_available() or not dist.is_initialized():
        return stats
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([stats["train_loss"] * stats["train_samples"], stats["train_samples"]], dtype=torch.float64)
    t = t.to(where)
    dist.all_reduce(t)
    total, seen = t.cpu().tolist()
    return {**stats, "train_loss": total / max(seen, 1.0), "train_samples": seen}


def _worker_identity(rank: int, rows_read: int, bytes_read: int) -> dict[str, Any]:
    """Where this rank ran (Ray node id when Ray runs, host, pid), how many training rows it was given this
    epoch and the stored bytes of the row groups it read for them: recorded per epoch in the history, so a run
    shows its placement and that each rank read about its share of the set."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"rank": rank, "node_id": node, "hostname": socket.gethostname(), "pid": os.getpid(),
            "rows_read": rows_read, "bytes_read": bytes_read}  # fmt: skip


def _gather_workers(info: dict[str, Any], world: int, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's :func:`_worker_identity`, in rank order (all ranks must call it)."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_available() or not dist.is_initialized():
        return [info]
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(device)  # all_gather_object stages the pickles on the current CUDA device
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, info)
    return sorted(gathered, key=lambda d: d["rank"])


def _epoch_line(cfg: FinetuneConfig, epoch: int, metrics: dict[str, Any]) -> str:
    vals = ", ".join(
        f"{k.removeprefix('val_')} {100 * v:.2f}%" for k, v in metrics.items() if k.startswith("val_")
    )  # fmt: skip
    return (
        f"[finetune {cfg.loss.tag}] epoch {epoch + 1}/{cfg.epochs} done in {metrics['epoch_seconds']:.0f} s: "
        f"loss {metrics['train_loss']:.4f} ({int(metrics['train_samples'])} samples, global batch "
        f"{metrics['global_batch_size']} on {metrics['world_size']} worker(s)); validation {vals}"
    )


def finetune_loop(
    cfg: FinetuneConfig, session: Any, sets: SampleSets | None = None, inputs: IdentityInputs | None = None
) -> dict[str, Any]:
    """Fine-tune for ``cfg.epochs`` epochs, resuming from the session's checkpoint, reporting every epoch.

    ``session`` is a TrainSession (Ray Train workers, DDP) or a Tune session (one trial in one process);
    the loop itself does not know which. ``sets``: where the prepared training and validation sets are
    (what the driver prepared); None finds or prepares them in ``cfg.store`` (in-process callers).
    ``inputs``: the fingerprints the driver checked; the parents and sets this worker loads must have them.
    A checkpoint is resumed only when it records this run's identity.
    """
    rank, world, device = session.rank, session.world, session.device
    torch.set_num_threads(cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)))
    retain_freed_heap()  # the training attack frees and re-allocates the same buffers every step
    torch.manual_seed(cfg.seed + rank)

    sets = sets or prepare_sample_sets(cfg)
    train_set = open_samples(sets.train)  # the description only: rows are read share by share below
    old, new = _load_parents(cfg, train_set)
    cached_mask = _cached_mask(cfg, train_set, old.fingerprint)
    here = identity_inputs(old, new, train_set, cached_mask)
    if inputs is not None:
        check_same_inputs(cfg, inputs, here)
    identity = finetune_identity(cfg, here)
    old_module = frozen_copy(old.module).to(device)
    theta0 = frozen_copy(new.module).to(device) if cfg.loss.kind == "rcat" else None
    module = new.module.train()
    if world > 1 and cfg.batchnorm == "global":
        module = global_batchnorm(module, device)  # statistics of the global batch, as one worker takes them
    model = session.prepare_model(module)
    inner = model.module if hasattr(model, "module") else model

    # batch_size is the global batch: this worker reads and trains on its share of each (not a DistributedSampler)
    # a set larger than the read cache is shuffled within windows of fixed-size blocks of rows (a function of the
    # data and the config, never of how the set happens to be stored), so each block is read once per epoch
    cache_bytes = int(cfg.read_cache_mib * 2**20)
    info = train_set.info
    window = shuffle_window(info.num_rows, info.row_nbytes, shuffle_block_rows(info.row_nbytes), cache_bytes)
    sampler = GlobalBatchSampler(
        len(train_set), cfg.batch_size, rank=rank, world_size=world, seed=cfg.seed, window=window
    )
    batches = StreamedGlobalBatches(sampler, train_set, augment=cfg.augment, cache_bytes=cache_bytes)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg.optimizer, cfg.epochs * len(sampler))
    amp_dtype = torch.float16 if cfg.mixed_precision and device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is not None else None
    cached = cached_mask[0] if cached_mask else None

    start_epoch = 0
    history: list[dict[str, Any]] = []
    checkpoint = session.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        check_state_identity(state, identity, "the snapshot to resume")
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state.get("history", []))

    val_set, val_attack = (open_samples(sets.validation), _validation_attack(cfg)) if rank == 0 else (None, None)
    old_val = per_model_table(old_module, val_set, val_attack, old.num_classes, device) if rank == 0 else None

    metrics: dict[str, Any] = {}
    run_name = identity.run_name(cfg)
    for epoch in range(start_epoch, cfg.epochs):
        _maybe_wait_at_gate(epoch, rank)
        _maybe_inject_fault(cfg, run_name, epoch, rank, world)
        sampler.set_epoch(epoch)  # the epoch's permutation, random starts, augmentation: functions of (seed, epoch)
        bar = (
            Progress(f"finetune {cfg.loss.tag} epoch {epoch + 1}/{cfg.epochs}", len(sampler), "batches")
            if rank == 0
            else None
        )
        t_epoch = time.perf_counter()
        stats = finetune_epoch(
            model,
            theta0,
            old_module,
            batches,
            optimizer,
            cfg.loss,
            cfg.train_attack,
            device=device,
            scheduler=scheduler,
            cached_mask=cached,
            scaler=scaler,
            amp_dtype=amp_dtype,
            progress=bar,
        )
        stats = _global_stats(stats, world, device)
        stats["epoch_seconds"] = time.perf_counter() - t_epoch  # training only, validation excluded
        workers = _gather_workers(_worker_identity(rank, batches.rows_read, batches.bytes_read), world, device)
        metrics = {
            "epoch": epoch,
            "attempt_start_epoch": start_epoch,
            "world_size": world,
            "global_batch_size": cfg.batch_size,
            **stats,
        }
        with _checkpoint_dir(cfg, run_name, epoch, session.persistent_checkpoints) as tmp:
            if rank == 0:
                metrics.update(validation_flips(old_val, inner, val_set, val_attack, old.num_classes, device))
                progress_log.info(_epoch_line(cfg, epoch, metrics))
                history.append({**metrics, "workers": workers})  # placement stays out of the scalar metrics
                torch.save({
                    "model": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch,
                    "rng_cpu": torch.get_rng_state(),
                    "history": history,
                    "identity": identity.digest,
                }, Path(tmp) / STATE_FILE)  # fmt: skip
            session.report(metrics, tmp if rank == 0 else None)
    return metrics


def _validation_attack(cfg: FinetuneConfig) -> AttackConfig:
    return cfg.validation.attack or AttackConfig(eps=cfg.train_attack.eps, attacks=("apgd-ce",), n_iter=10)


def check_state_identity(state: dict[str, Any], identity: FinetuneIdentity, what: str) -> None:
    """Refuse a training state recorded under another identity (or none): loading it would continue, or write
    out, a model trained from other parents, data or settings than this run names."""
    found = state.get("identity")
    if found != identity.digest:
        raise RunIdentityError(
            f"{what} belongs to fine-tune {found or '(no identity recorded)'}, not to this run ({identity.digest}); "
            "it is not loaded"
        )


@contextmanager
def _checkpoint_dir(cfg: FinetuneConfig, run_name: str, epoch: int, persistent: bool) -> Iterator[str]:
    """Where an epoch's checkpoint is written before ``report``: a temporary folder that Ray copies into
    its storage, or (``persistent``) a folder under the storage path that outlives the call."""
    if not persistent:
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    folder = Path(cfg.storage).expanduser().resolve() / run_name / "local" / f"epoch-{epoch:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    yield str(folder)


def _maybe_wait_at_gate(epoch: int, rank: int) -> None:
    """Testing aid (see TEST_GATE_ENV): hold every epoch after the first until the test opens it."""
    folder = os.environ.get(TEST_GATE_ENV)
    if not folder or epoch == 0:
        return
    gate = Path(folder)
    here = _worker_identity(rank, 0, 0)
    (gate / f"arrived-e{epoch}-r{rank}-p{os.getpid()}").write_text(json.dumps(here))
    deadline = time.monotonic() + 600
    while not (gate / f"open-e{epoch}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"epoch gate {gate}/open-e{epoch} was never opened")
        time.sleep(0.05)


def _maybe_inject_fault(cfg: FinetuneConfig, run_name: str, epoch: int, rank: int, world: int) -> None:
    """Testing aid for fault tolerance: one worker raises once, the first time it reaches the epoch."""
    if cfg.fail_once_at_epoch is None or epoch != cfg.fail_once_at_epoch or rank != min(1, world - 1):
        return
    marker = Path(cfg.storage).expanduser().resolve() / run_name / ".fault-injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} epoch {epoch}\n")
    raise RuntimeError(f"injected fault on rank {rank} at epoch {epoch}")


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


def output_paths(cfg: FinetuneConfig, identity: FinetuneIdentity) -> tuple[Path, Path]:
    """(checkpoint, manifest) of a fine-tune: ``output`` and its ``.json`` when the config names an exact path,
    else ``<out>/<name>-<identity>.pt`` (``finetune-<loss>-<identity>.pt`` without a name), so that a run with
    other parents, data or settings under the same name gets files of its own."""
    if cfg.output:
        path = Path(cfg.output)
        return path, path.with_suffix(".json")
    label = f"{cfg.name}-{identity.short}" if cfg.name else identity.run_name(cfg)
    out = Path(cfg.out).expanduser()
    return out / f"{label}.pt", out / f"{label}.json"


def finished_finetune(cfg: FinetuneConfig, identity: FinetuneIdentity) -> FinetuneOutcome | None:
    """The fine-tune already at the output path when it has this identity; None when there is none.

    RunIdentityError (exit 2, nothing trained, nothing overwritten) when the path holds another fine-tune, or a
    checkpoint whose weights are not the ones its manifest records.
    """
    path, manifest_path = output_paths(cfg, identity)
    if not path.exists():
        return None
    try:
        meta = checkpoint_metadata(path)
    except ModelError as err:
        raise RunIdentityError(f"{err}; it is not overwritten: choose another --output") from None
    recorded = meta.get("identity")
    if recorded != identity.digest:
        raise RunIdentityError(
            f"{path} holds fine-tune {recorded or '(no identity recorded)'}, but this command asks for "
            f"{identity.digest} (other parents, data or settings); it is not overwritten: choose another --output, "
            "or leave --output out to name the file by the run's identity"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        fingerprint = manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # this fine-tune's checkpoint without its manifest (written last): written again
    if meta.get("fingerprint") != fingerprint or manifest.get("identity") != identity.digest:
        raise RunIdentityError(f"{path}: its weights are not the ones {manifest_path} records (damaged); move it away")
    return FinetuneOutcome(path, manifest_path, fingerprint, list(manifest.get("history", [])), reused=True)


def check_finetune_inputs(cfg: FinetuneConfig) -> Parents:
    """Everything that can be wrong, checked in the driver before any worker starts; returns the parents
    so the driver does not load them again after training.

    Prepares the training and validation sets in the store on first use (later runs reuse them) and checks
    the models on two training rows: the training split itself is never loaded here. The output path must be
    free or hold this very fine-tune (same identity).
    """
    from rcat_ray.evaluate.plan import validate_pair_inputs

    train_set = training_samples(cfg)
    old, new = _load_parents(cfg, train_set)
    validate_pair_inputs([old, new], train_set.to_split(0, min(2, len(train_set))))
    if "arch" not in new.source:
        raise ValueError("the new model's architecture is unknown; it cannot be saved after fine-tuning")
    # FinetuneInputError for flags that are not the old model's on this selection, or do not cover it
    cached = _cached_mask(cfg, train_set, old.fingerprint)
    val_set, _ = validation_setup(cfg)
    Path(cfg.out).expanduser().mkdir(parents=True, exist_ok=True)
    inputs = identity_inputs(old, new, train_set, cached)
    parents = Parents(old, new, train_set.info.shape, SampleSets(train_set.uri, val_set.uri), inputs)
    parents.finished = finished_finetune(cfg, parents.identity(cfg))  # RunIdentityError: another fine-tune there
    return parents


def run_finetune(cfg: FinetuneConfig, parents: Parents | None = None) -> FinetuneOutcome:
    """Fine-tune on Ray Train and write the final checkpoint and manifest into ``cfg.out``.

    ``parents``: what :func:`check_finetune_inputs` returned, for a caller that checked the inputs
    before starting Ray (so that a bad input fails fast and the parents are not loaded twice). A fine-tune
    with the same identity already at the output path is returned as it is (``reused``); the Ray Train run
    folder is named by the identity, so only a snapshot of this very fine-tune is ever resumed.
    """
    if parents is None:
        parents = check_finetune_inputs(cfg)
    identity = parents.identity(cfg)
    done = finished_finetune(cfg, identity)
    if done is not None:
        return done
    sets = parents.samples or prepare_sample_sets(cfg)
    # small by design: the config, two set locations and the fingerprints; workers read rows and load models
    loop_config = {
        "finetune": cfg.model_dump(mode="json"),
        "driver_pid": os.getpid(),
        "samples": sets.to_json(),
        "inputs": parents.inputs.to_json() if parents.inputs else None,
    }
    result = train_run(cfg, identity, loop_config).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning {identity.run_name(cfg)} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    # the history travels in the checkpoint, so it spans worker-group restarts
    return _write_final(cfg, state, list(state.get("history", [])), parents)


class _Trainer(TorchTrainer):
    """TorchTrainer that leaves Ctrl+C to the caller: Ray Train's own SIGINT handler aborts the run and exits
    the process with status 1 and no word of what was kept; without it, the CLI says that the finished epochs'
    snapshots are kept, shuts Ray down and exits 130, and the same command resumes the run."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None


def train_run(cfg: FinetuneConfig, identity: FinetuneIdentity, loop_config: dict[str, Any],
              callbacks: list[Any] | None = None, run_name: str | None = None) -> TorchTrainer:  # fmt: skip
    """The one TorchTrainer of a fine-tune (the CLI's, the demo's and a sweep trial's with workers): its run
    folder is the identity's (``run_name`` adds to it for a sweep trial), and the loop resumes a snapshot there
    only when it records this identity."""
    storage = str(Path(cfg.storage).expanduser().resolve()) if "://" not in cfg.storage else cfg.storage
    return _Trainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling(cfg),
        run_config=RunConfig(
            name=run_name or identity.run_name(cfg),
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            **quiet.train_run_options(),
        ),
    )


def scaling(cfg: FinetuneConfig) -> ScalingConfig:
    """The worker group of a fine-tune: ``num_workers`` workers with their CPUs (and a GPU each)."""
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def _write_final(
    cfg: FinetuneConfig, state: dict[str, Any], history: list[dict[str, Any]], parents: Parents
) -> FinetuneOutcome:
    """Write the trained state as a self-describing checkpoint with its manifest, after checking that the state
    is this fine-tune's (its identity)."""
    old, new = parents.old, parents.new
    identity = parents.identity(cfg)
    check_state_identity(state, identity, "the trained state")
    finished_finetune(cfg, identity)  # again: another run may have written another fine-tune there meanwhile
    module = copy.deepcopy(new.module)  # the parent stays as it was loaded
    module.load_state_dict(state["model"])
    path, manifest_path = output_paths(cfg, identity)
    manifest = {
        "kind": "finetuned-model",
        "run_name": identity.run_name(cfg),
        "label": path.stem,
        "identity": identity.digest,
        "identity_inputs": identity.hashed,
        "method": cfg.loss.tag,
        "config": cfg.model_dump(mode="json"),
        "parents": {"old": old.describe(), "new": new.describe()},
        "batchnorm": {"model_has_batchnorm": has_batchnorm(module), "statistics": cfg.batchnorm,
                      "workers": max(1, cfg.num_workers)},
        "epochs_completed": int(state["epoch"]) + 1,
        "history": history,
        "versions": package_versions(),
        "created_at": now_iso(),
    }  # fmt: skip
    arch_kwargs = new.source.get("arch_kwargs", {})
    fingerprint = save_checkpoint(
        path, module, arch=new.source["arch"], num_classes=new.num_classes, input_shape=parents.input_shape,
        arch_kwargs=arch_kwargs,
        metadata={"method": cfg.loss.tag, "old_fingerprint": old.fingerprint, "new_fingerprint": new.fingerprint,
                  "run_name": identity.run_name(cfg), "identity": identity.digest},
    )  # fmt: skip
    manifest["fingerprint"] = fingerprint
    # the manifest is written last: a checkpoint without one is not a finished fine-tune
    write_file_atomic(manifest_path, json.dumps(manifest, indent=2, default=str))
    return FinetuneOutcome(path, manifest_path, fingerprint, history)
