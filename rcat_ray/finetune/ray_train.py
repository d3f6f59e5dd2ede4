"""Ray Train adapter of the fine-tune: the TorchTrainer (DDP; gloo on CPU, nccl on GPU) and its per-worker loop.

Each worker reads only its share of every global batch from the prepared training set, by position
(:class:`rcat_ray.core.finetune_epoch.StreamedGlobalBatches`), not through ``get_dataset_shard``: Ray Train's
``streaming_split`` hands blocks to whichever worker asks next, so 1 and N workers would train different
models. Every epoch rank 0 measures validation flips and saves a snapshot; a restarted worker group resumes
from the latest one, and trains as a run that never stopped (an epoch depends only on (seed, epoch)).
See docs/architecture.md (the data path) and docs/contracts.md.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rcat_ray.config import parse_config
from rcat_ray.core.batchnorm import global_batchnorm
from rcat_ray.core.finetune_epoch import (
    GlobalBatchSampler,
    StreamedGlobalBatches,
    finetune_epoch,
    frozen_copy,
    make_optimizer,
    shuffle_block_rows,
    shuffle_window,
)
from rcat_ray.core.progress import Progress
from rcat_ray.core.samples import open_samples
from rcat_ray.core.validation import per_model_table, validation_flips
from rcat_ray.finetune.checkpoints import STATE_FILE, check_state_identity, read_state
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.identity import FinetuneIdentity, IdentityInputs, finetune_identity
from rcat_ray.finetune.inputs import cached_mask as load_cached_mask
from rcat_ray.finetune.inputs import check_same_inputs, identity_inputs
from rcat_ray.finetune.sets import SampleSets, load_parents, prepare_sample_sets, validation_attack
from rcat_ray.runtime import hooks, quiet
from rcat_ray.runtime.allocator import retain_freed_heap

progress_log = logging.getLogger("rcat_ray.core.progress")
#: Snapshots a run keeps (a fine-tune's Ray Train run and a sweep's Tune trials): the latest to resume from
#: and the one before it.
KEEP_CHECKPOINTS = 2


class TrainSession:
    """The loop's view of Ray Train: ranks, device, DDP preparation, checkpoints and reports."""

    def __init__(self, cfg: FinetuneConfig):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.compute.use_gpu else torch.device("cpu")
        # local mode keeps only the checkpoint's path, so its folder must outlive report()
        self.persistent_checkpoints = cfg.compute.num_workers == 0

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=self.device)

    def get_checkpoint(self) -> Any:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ck = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ck)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker loop that Ray Train runs (also runs in-process with ``compute.num_workers: 0``).

    ``loop_config``: the config (JSON), the driver's pid, ``samples`` (:class:`SampleSets` as JSON): where the
    prepared sets are, and ``inputs`` (:class:`IdentityInputs` as JSON): the fingerprints the driver checked,
    which every worker checks again on what it loads. Without ``samples`` the worker finds (or prepares) the
    sets in the store itself.
    """
    cfg = parse_config(FinetuneConfig, loop_config["finetune"])
    hooks.receive(loop_config)  # testing aids the driver forwarded (none in a user's run)
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
    return {
        "rank": rank,
        "node_id": node,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "rows_read": rows_read,
        "bytes_read": bytes_read,
    }


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
    vals = ", ".join(f"{k.removeprefix('val_')} {100 * v:.2f}%" for k, v in metrics.items() if k.startswith("val_"))
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
    torch.set_num_threads(cfg.compute.threads)
    retain_freed_heap()  # the training attack frees and re-allocates the same buffers every step
    torch.manual_seed(cfg.seed + rank)

    sets = sets or prepare_sample_sets(cfg)
    train_set = open_samples(sets.train)  # the description only: rows are read share by share below
    old, new = load_parents(cfg, train_set)
    cached_mask = load_cached_mask(cfg, train_set, old.fingerprint)
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
            state = read_state(d)
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

    val_set, val_attack = (open_samples(sets.validation), validation_attack(cfg)) if rank == 0 else (None, None)
    old_val = per_model_table(old_module, val_set, val_attack, old.num_classes, device) if rank == 0 else None

    metrics: dict[str, Any] = {}
    run_name = identity.run_name(cfg)
    for epoch in range(start_epoch, cfg.epochs):
        hooks.epoch_gate(epoch, rank, lambda: _worker_identity(rank, 0, 0))  # testing aids: no-ops unless set
        hooks.fail_once_at_epoch(epoch, rank, world, lambda: _storage_folder(cfg) / run_name)
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
                torch.save(
                    {
                        "model": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch,
                        "rng_cpu": torch.get_rng_state(),
                        "history": history,
                        "identity": identity.digest,
                    },
                    Path(tmp) / STATE_FILE,
                )
            session.report(metrics, tmp if rank == 0 else None)
    return metrics


def _storage_folder(cfg: FinetuneConfig) -> Path:
    """The local folder of the Ray Train storage path."""
    return Path(cfg.storage).expanduser().resolve()


def storage_path(storage: str) -> str:
    """A storage path as Ray Train and Tune take it: a URI as it is, a local path absolute."""
    return str(Path(storage).expanduser().resolve()) if "://" not in storage else storage


@contextmanager
def _checkpoint_dir(cfg: FinetuneConfig, run_name: str, epoch: int, persistent: bool) -> Iterator[str]:
    """Where an epoch's checkpoint is written before ``report``: a temporary folder that Ray copies into
    its storage, or (``persistent``) a folder under the storage path that outlives the call."""
    if not persistent:
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
        return
    folder = _storage_folder(cfg) / run_name / "local" / f"epoch-{epoch:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    yield str(folder)


class _Trainer(TorchTrainer):
    """TorchTrainer that leaves Ctrl+C to the caller: Ray Train's own SIGINT handler aborts the run and exits
    the process with status 1 and no word of what was kept; without it, the CLI says that the finished epochs'
    snapshots are kept, shuts Ray down and exits 130, and the same command resumes the run."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None


def train_run(
    cfg: FinetuneConfig,
    identity: FinetuneIdentity,
    loop_config: dict[str, Any],
    callbacks: list[Any] | None = None,
    run_name: str | None = None,
    quiet_logs: bool | None = None,
) -> TorchTrainer:
    """The one TorchTrainer builder (the CLI's fine-tune, the demo's, and a sweep trial's with workers): its run
    folder is the identity's (``run_name`` adds to it for a sweep trial), and the loop resumes a snapshot there
    only when it records this identity. ``quiet_logs``: Ray Train's console logs at ERROR; by default as this
    process's quiet mode says (a sweep trial runs in a process of its own and is told)."""
    quiet_logs = quiet.is_quiet() if quiet_logs is None else quiet_logs
    return _Trainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, **hooks.forwarded()},
        scaling_config=scaling(cfg),
        run_config=RunConfig(
            name=run_name or identity.run_name(cfg),
            storage_path=storage_path(cfg.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            **({"logging_config": LoggingConfig(log_level="ERROR")} if quiet_logs else {}),
        ),
    )


def scaling(cfg: FinetuneConfig) -> ScalingConfig:
    """The worker group of a fine-tune: ``compute.num_workers`` workers with their CPUs and GPUs."""
    c = cfg.compute
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.use_gpu else {})}
    return ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources)
