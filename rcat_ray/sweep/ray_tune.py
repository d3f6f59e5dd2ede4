"""Ray Tune adapter of the sweep: the Tuner, its trainable, and the reading of its results.

A trial that fits on one device trains inside the trial process; a trial configured with several workers
runs the fine-tune's TorchTrainer (:func:`rcat_ray.finetune.ray_train.train_run`) and forwards its metrics to
Tune. Both run the same loop, which reports cheap validation flips every epoch, so ASHA can stop trials early.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pandas as pd
import ray
import ray.tune
import torch

from rcat_ray.config import parse_config
from rcat_ray.errors import ConfigError, SweepInterruptedError
from rcat_ray.finetune.checkpoints import read_state
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.identity import IdentityInputs, finetune_identity
from rcat_ray.finetune.ray_train import KEEP_CHECKPOINTS, finetune_loop, storage_path, train_run
from rcat_ray.runtime import quiet
from rcat_ray.sweep.config import Resume, SweepConfig
from rcat_ray.sweep.trials import apply_trial, optuna_space, planned_trials, trial_settings, trial_table


class TuneSession:
    """The loop's view of a Tune trial: one process, one device, Tune's checkpoints and reports."""

    rank, world = 0, 1
    persistent_checkpoints = False  # Tune copies the reported folder into the trial's storage

    def __init__(self, cfg: FinetuneConfig):
        self.device = torch.device("cuda" if cfg.compute.use_gpu and torch.cuda.is_available() else "cpu")

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def get_checkpoint(self) -> Any:
        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ck = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # the Ray node the trial ran on (Tune's own node_ip is the same for every node of one machine)
        ray.tune.report({**metrics, "node_id": ray.get_runtime_context().get_node_id()}, checkpoint=ck)


def sweep_trainable(config: dict[str, Any]) -> None:
    """A Tune function trainable: one fine-tuning run (in-process, or a TorchTrainer when it has workers).

    ``config["inputs"]``: the fingerprints of the parents and data the driver checked; the trial checks what it
    loads against them. A trial with workers has a Ray Train run of its own (the identity, the sweep and the
    trial): a retried trial resumes it, and no other run's snapshot, finished or not, stands in for the trial.
    """
    base = parse_config(FinetuneConfig, config["base"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_trial(base, trial_settings(config), name=f"{config['sweep']}-{trial_id}")
    if not config.get("inputs"):
        raise ConfigError(
            f"sweep {config['sweep']} was started by an earlier rcat_ray that did not record its inputs' fingerprints; "
            "start it again under another name"
        )
    inputs = IdentityInputs.from_json(config["inputs"])
    if cfg.compute.num_workers <= 1:
        finetune_loop(cfg, TuneSession(cfg), inputs=inputs)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    identity = finetune_identity(cfg, inputs)
    loop_config = {"finetune": cfg.model_dump(mode="json"), "inputs": inputs.to_json()}
    run_name = f"{identity.run_name(cfg)}-{config['sweep']}-{trial_id}"
    trainer = train_run(
        cfg,
        identity,
        loop_config,
        callbacks=[TuneReportCallback()],
        run_name=run_name,
        quiet_logs=bool(config.get("quiet")),
    )
    trainer.fit()


#: CPUs the driver of a trial with workers holds while its Ray Train run trains (Tune refuses 0).
TRIAL_DRIVER_CPUS = 0.01


def check_trial_fits(cfg: SweepConfig) -> None:
    """Refuse a sweep whose trials with workers can never start: the trial's own share plus its Train workers must
    fit the cluster's CPUs, or Tune waits forever with the trial holding its share (2 workers of 1 CPU on 2 CPUs)."""
    c = cfg.base.compute
    if c.num_workers <= 1 or not ray.is_initialized():
        return
    need = TRIAL_DRIVER_CPUS + c.num_workers * c.cpus_per_worker
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if need > have + 1e-9:
        fit = (have - TRIAL_DRIVER_CPUS) / c.num_workers
        raise ConfigError(
            f"a trial trains on {c.num_workers} workers of {c.cpus_per_worker:g} CPU, plus {TRIAL_DRIVER_CPUS} "
            f"for the trial itself ({need:g} CPUs), but the cluster has {have:g}: set base.compute.cpus_per_worker "
            f"to at most {int(fit * 100) / 100:g} or use fewer workers"
        )


def _max_concurrent(cfg: SweepConfig) -> int | None:
    """Trials at once: the configured number, else, for trials with workers, as many as the cluster's CPUs hold
    with their workers (Tune counts only a trial's 0.01 CPU, so it would start every trial, and their worker
    groups would wait for each other's CPUs until Ray Train gives up)."""
    c = cfg.base.compute
    if cfg.max_concurrent is not None or c.num_workers <= 1 or not ray.is_initialized():
        return cfg.max_concurrent
    have = float(ray.cluster_resources().get("CPU", 0.0))
    return max(1, int((have + 1e-9) // (TRIAL_DRIVER_CPUS + c.num_workers * c.cpus_per_worker)))


def build_tuner(cfg: SweepConfig, *, resume: Resume, inputs: IdentityInputs) -> ray.tune.Tuner:
    """A new Tuner, or the interrupted one restored from storage (finished trials are not rerun; ``"auto"``:
    restored when there is one, else new). ``inputs``:
    the fingerprints of the parents and data every trial trains from (checked by the trials)."""
    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    if cfg.base.compute.num_workers > 1:  # pattern B: the trial driver only coordinates; workers bring their own
        resources = {"cpu": TRIAL_DRIVER_CPUS}
    trainable = ray.tune.with_resources(sweep_trainable, resources)
    path = f"{storage_path(cfg.storage)}/{cfg.name}"
    if resume:
        if ray.tune.Tuner.can_restore(path):
            return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        if resume != "auto":
            raise FileNotFoundError(f"no sweep to resume at {path}")

    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # "quiet": a trial's TorchTrainer logs as quietly as this driver (a trial runs in a process of its own)
    base = {
        "base": cfg.base.model_dump(mode="json"),
        "sweep": cfg.name,
        "inputs": inputs.to_json(),
        "quiet": quiet.is_quiet(),
    }
    trials = planned_trials(cfg)
    search_alg = None
    if trials is not None:
        param_space = {**base, "trial": ray.tune.grid_search(trials)}
        num_samples = 1
    else:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        param_space = base
        num_samples = cfg.num_samples
        search_alg = OptunaSearch(space=optuna_space(cfg), metric="val_s_nfr", mode="min", seed=cfg.seed)
        search_alg = ConcurrencyLimiter(search_alg, max_concurrent=cfg.max_concurrent or 2)
    max_epochs = max((*cfg.space.epochs, cfg.base.epochs))
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_epochs,
            grace_period=cfg.asha.grace_period,
            reduction_factor=cfg.asha.reduction_factor,
        )
        if cfg.asha.enabled
        else FIFOScheduler()
    )
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric="val_s_nfr",
            mode="min",
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=_max_concurrent(cfg),
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.name,
            storage_path=storage_path(cfg.storage),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            failure_config=ray.tune.FailureConfig(max_failures=1),
            **({"verbose": 0} if quiet.is_quiet() else {}),  # Tune's trial tables; our progress lines stay
        ),
    )


def raise_if_unfinished(cfg: SweepConfig, results: Any) -> None:
    """Tune returns normally after Ctrl+C; a sweep with unfinished or not yet started trials must not be judged."""
    statuses = [t.status for t in ray.tune.ExperimentAnalysis(results.experiment_path).trials]
    planned = planned_trials(cfg)
    expected = len(planned) if planned is not None else cfg.num_samples
    finished = sum(s in ("TERMINATED", "ERROR") for s in statuses)
    if finished < expected:
        raise SweepInterruptedError(
            f"sweep {cfg.name} stopped with {finished} of {expected} trials finished; its state is saved: "
            "continue with `rcat-ray sweep --config <file> --resume`"
        )


@contextlib.contextmanager
def _sigint_restored() -> Iterator[None]:
    """Give SIGINT back to its previous handler when Tune returns. Tune installs its own (Ctrl+C ends the run
    and saves its state) and only restores the old one after a first Ctrl+C, so without this a Ctrl+C during
    the minutes of judging that follow would be swallowed by a Tune run that is already over."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def tune_trials(cfg: SweepConfig, *, resume: Resume, inputs: IdentityInputs) -> pd.DataFrame:
    """Run (or resume) the Tune sweep to its end; one row per trial (see :func:`trial_table`).
    SweepInterruptedError when trials are left (Tune returns normally after Ctrl+C)."""
    check_trial_fits(cfg)
    with _sigint_restored():
        results = build_tuner(cfg, resume=resume, inputs=inputs).fit()
    raise_if_unfinished(cfg, results)
    return trial_table(results)


def trial_state(checkpoint: str) -> dict[str, Any]:
    """The training state of a trial's final Tune checkpoint."""
    with ray.tune.Checkpoint(checkpoint).as_directory() as folder:
        return read_state(folder)
