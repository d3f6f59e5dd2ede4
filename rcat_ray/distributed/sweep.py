"""Ray Tune sweeps of the fine-tuning weights (alpha, beta), training eps, learning rate and epochs.

A trial that fits on one device trains inside the trial process (RAY_NOTES pattern A, the cheap one); a
trial configured with several workers runs a TorchTrainer and forwards its metrics to Tune (pattern B).
Both run the same loop (:func:`rcat_ray.distributed.train.finetune_loop`), which reports validation flips
against the old model every epoch, so ASHA can stop trials on the validation S-NFR. The choice among the
finished trials follows :mod:`rcat_ray.selection`; the chosen model is then written as a checkpoint and,
when test settings are given, evaluated through the flip engine into the paper-style table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import ray.tune
import torch
import yaml

from rcat_ray.config import FinetuneConfig, SweepConfig, parse_config
from rcat_ray.core.models import LoadedModel
from rcat_ray.core.validation import per_model_table
from rcat_ray.distributed.train import (
    STATE_FILE,
    Parents,
    _write_final,
    check_finetune_inputs,
    finetune_loop,
    train_loop_per_worker,
    validation_setup,
)
from rcat_ray.search_space import expand, paper_grid, random_trials
from rcat_ray.selection import SweepFailedError, pareto_front, select_trial
from rcat_ray.store import write_file_atomic

TRIAL_KEYS = ("kind", "alpha", "beta", "train_eps", "lr", "epochs")


class SweepInterruptedError(RuntimeError):
    """The sweep was stopped (Ctrl+C, SIGINT) before every trial finished; it can be resumed."""


class TuneSession:
    """The loop's view of a Tune trial: one process, one device, Tune's checkpoints and reports."""

    rank, world = 0, 1
    persistent_checkpoints = False  # Tune copies the reported folder into the trial's storage

    def __init__(self, cfg: FinetuneConfig):
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def get_checkpoint(self) -> Any:
        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ck = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=ck)


def trial_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The flat trial settings (kind, alpha, beta, ...) from a grid/random trial or an Optuna suggestion."""
    if "trial" in config:
        t = config["trial"]
        return {**t["loss"], **{k: t[k] for k in ("train_eps", "lr", "epochs") if k in t}}
    out = {k: config[k] for k in ("kind", "train_eps", "lr", "epochs") if k in config}
    if out.get("kind") == "rcat":
        out.update(alpha=config["rcat_alpha"], beta=config["rcat_beta"])
    elif out.get("kind") in ("pct", "pcat"):
        out.update(alpha=1.0, beta=config["pct_beta"])
    return out


def apply_trial(base: FinetuneConfig, settings: dict[str, Any], name: str) -> FinetuneConfig:
    """The fine-tuning config of one trial: the base with the trial's loss, eps, lr and epochs."""
    loss = base.loss.model_dump()
    loss.update({k: settings[k] for k in ("kind", "alpha", "beta") if k in settings})
    raw = base.model_dump(mode="json")
    raw["loss"] = loss
    if "train_eps" in settings:
        raw["train_attack"]["eps"] = settings["train_eps"]
    if "lr" in settings:
        raw["optimizer"]["lr"] = settings["lr"]
    if "epochs" in settings:
        raw["epochs"] = settings["epochs"]
    raw["name"] = name
    return parse_config(FinetuneConfig, raw)


def sweep_trainable(config: dict[str, Any]) -> None:
    """A Tune function trainable: one fine-tuning run (in-process, or a TorchTrainer when it has workers)."""
    base = parse_config(FinetuneConfig, config["base"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_trial(base, trial_settings(config), name=f"{config['sweep']}-{trial_id}")
    if cfg.num_workers <= 1:
        finetune_loop(cfg, TuneSession(cfg))
        return
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"finetune": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name,  # deterministic: a retried trial resumes its Train run
            storage_path=str(Path(cfg.storage).expanduser().resolve()) if "://" not in cfg.storage else cfg.storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    ).fit()


def optuna_space(cfg: SweepConfig):
    """Optuna's define-by-run space: RCAT's beta is drawn below 1 - alpha, so the simplex is never left."""
    sp = cfg.space

    def space(trial: Any) -> None:
        kind = trial.suggest_categorical("kind", list(sp.losses))
        # per-kind parameter names: Optuna keeps one distribution per name (log scale for PCT's beta only)
        if kind == "rcat":
            a = trial.suggest_float("rcat_alpha", sp.alpha_range[0], min(sp.alpha_range[1], 1.0))
            hi = min(sp.beta_range[1], 1.0 - a)
            trial.suggest_float("rcat_beta", min(sp.beta_range[0], hi), hi)
        elif kind in ("pct", "pcat"):
            trial.suggest_float("pct_beta", sp.pct_beta_range[0], sp.pct_beta_range[1], log=True)
        for key in ("train_eps", "lr", "epochs"):
            choices = getattr(sp, key)
            if choices:
                trial.suggest_categorical(key, list(choices))

    return space


def planned_trials(cfg: SweepConfig) -> list[dict[str, Any]] | None:
    """The trials of grid and random search (None for Optuna, which proposes them as it goes)."""
    sp = cfg.space
    if cfg.mode == "grid":
        losses = paper_grid(sp.losses)
    elif cfg.algorithm == "random":
        losses = random_trials(sp.losses, cfg.num_samples, cfg.seed, alpha_range=sp.alpha_range,
                               beta_range=sp.beta_range, pct_beta_range=sp.pct_beta_range)  # fmt: skip
    else:
        return None
    return expand(losses, train_eps=sp.train_eps, lr=sp.lr, epochs=sp.epochs)


@dataclass
class SweepOutcome:
    """The trial table, the chosen trial, and the files written."""

    trials: pd.DataFrame
    chosen: pd.Series
    new_val_rob_acc: float
    best_yaml: Path
    checkpoint: Path
    out: Path
    table: Any = None  # the paper-style table on the test settings, when given


def _storage(cfg: SweepConfig) -> str:
    return str(Path(cfg.storage).expanduser().resolve()) if "://" not in cfg.storage else cfg.storage


def build_tuner(cfg: SweepConfig, *, resume: bool) -> ray.tune.Tuner:
    """A new Tuner, or the interrupted one restored from storage (finished trials are not rerun)."""
    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    if cfg.base.num_workers > 1:  # pattern B: the trial driver only coordinates; workers bring their own
        resources = {"cpu": 0.01}
    trainable = ray.tune.with_resources(sweep_trainable, resources)
    path = f"{_storage(cfg)}/{cfg.name}"
    if resume:
        if not ray.tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"no sweep to resume at {path}")
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)

    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base = {"base": cfg.base.model_dump(mode="json"), "sweep": cfg.name}
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
        ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=cfg.asha.grace_period,
                      reduction_factor=cfg.asha.reduction_factor)
        if cfg.asha.enabled else FIFOScheduler()
    )  # fmt: skip
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric="val_s_nfr",
            mode="min",
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=cfg.max_concurrent,
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.name, storage_path=_storage(cfg), failure_config=ray.tune.FailureConfig(max_failures=1)
        ),
    )


def trial_table(results: Any) -> pd.DataFrame:
    """One row per trial: its settings, its last reported metrics, epochs run, and its checkpoint."""
    rows = []
    for r in results:
        metrics = r.metrics or {}
        cfg = r.config or {}
        settings = trial_settings(cfg) if cfg else {}
        ck_path = metrics.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else None)
        rows.append({
            "trial_id": metrics.get("trial_id"),
            **{k: settings.get(k) for k in TRIAL_KEYS},
            "epochs_run": metrics.get("training_iteration"),
            **{k: v for k, v in metrics.items() if k.startswith(("val_", "train_loss"))},
            "checkpoint": ck_path,
            "error": str(r.error) if r.error else None,
        })  # fmt: skip
    return pd.DataFrame(rows).sort_values("trial_id", kind="mergesort").reset_index(drop=True)


def _raise_if_unfinished(cfg: SweepConfig, results: Any) -> None:
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


def new_model_val_rob_acc(base: FinetuneConfig, new: LoadedModel) -> float:
    """Validation robust accuracy of the new model before fine-tuning: the bar of the selection rule."""
    val_split, val_attack = validation_setup(base)
    table = per_model_table(new.module.eval(), val_split, val_attack, new.num_classes, torch.device("cpu"))
    return float(table.column("robust").to_numpy(zero_copy_only=False).astype(bool).mean())


def _raise_if_all_failed(trials: pd.DataFrame) -> None:
    """A sweep whose every trial errored has no metrics to choose on: say why, with the first trial's error."""
    failed = trials["error"].notna() if "error" in trials else pd.Series(False, index=trials.index)
    has_metrics = trials["val_s_nfr"].notna() if "val_s_nfr" in trials else pd.Series(False, index=trials.index)
    if len(trials) and not (has_metrics & ~failed).any():
        first = trials[failed].iloc[0] if failed.any() else trials.iloc[0]
        error = str(first.get("error") or "no trial reported validation metrics").strip()
        lines = [line for line in error.splitlines() if line.strip()]
        # Ray wraps the trial's exception in a traceback; its last line is the error itself
        raise SweepFailedError(f"all {len(trials)} trials failed; the first ({first['trial_id']}): {lines[-1]}")


def run_sweep(cfg: SweepConfig, *, resume: bool = False, parents: Parents | None = None) -> SweepOutcome:
    """Run (or resume) the sweep, write the trial table, choose a trial, write its model and the plots.

    ``parents``: the models as already checked by the caller (before Ray started); checked here otherwise.
    """
    from rcat_ray.sweep_report import write_sweep_outputs

    parents = parents or check_finetune_inputs(cfg.base)
    new_rob = new_model_val_rob_acc(cfg.base, parents.new)
    results = build_tuner(cfg, resume=resume).fit()
    _raise_if_unfinished(cfg, results)
    trials = trial_table(results)
    _raise_if_all_failed(trials)
    chosen = select_trial(trials, new_rob_acc=new_rob, tolerance=cfg.tolerance)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    chosen_cfg = apply_trial(cfg.base, {k: chosen[k] for k in TRIAL_KEYS if pd.notna(chosen[k])},
                             name=f"{cfg.name}-{chosen['trial_id']}")  # fmt: skip
    chosen_cfg = chosen_cfg.model_copy(update={"out": str(out)})
    with ray.tune.Checkpoint(chosen["checkpoint"]).as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    final = _write_final(chosen_cfg, state, list(state.get("history", [])), parents)
    best = {
        "rule": f"lowest val_s_nfr among trials with val_rob_acc >= {new_rob:.4f} - {cfg.tolerance} "
        "(ties: higher val_rob_acc, then lower trial id)",
        "new_model_val_rob_acc": new_rob,
        "trial_id": chosen["trial_id"],
        "metrics": {k: float(chosen[k]) for k in trials.columns if k.startswith("val_") and pd.notna(chosen[k])},
        "checkpoint": str(final.checkpoint),
        "finetune": chosen_cfg.model_dump(mode="json"),
    }
    best_yaml = out / "best.yaml"
    write_file_atomic(best_yaml, yaml.safe_dump(best, sort_keys=False))
    trials = trials.assign(pareto_r_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_r_nfr"),
                           pareto_s_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_s_nfr"),
                           chosen=trials["trial_id"] == chosen["trial_id"])  # fmt: skip
    outcome = SweepOutcome(trials, chosen, new_rob, best_yaml, final.checkpoint, out)
    if cfg.test is not None:
        outcome.table = _evaluate_on_test(cfg, chosen_cfg, final.checkpoint, out)
    write_sweep_outputs(cfg, outcome)
    return outcome


def _evaluate_on_test(cfg: SweepConfig, chosen_cfg: FinetuneConfig, checkpoint: Path, out: Path) -> Any:
    """The chosen model through the flip engine on the test settings, in the paper-style table."""
    from rcat_ray.config import ModelConfig, TableConfig, TableEntry, TablePair
    from rcat_ray.workflows import run_table

    label = chosen_cfg.loss.tag
    entry = TableEntry(
        label=label, model=ModelConfig(source="checkpoint", name=label, label=label, path=str(checkpoint))
    )
    pair = TablePair(name=f"{cfg.name}: chosen {label}", old=cfg.base.old, new=cfg.base.new, finetuned=(entry,))
    table_cfg = TableConfig(**cfg.test.model_dump(), bootstrap=cfg.bootstrap, out=str(out / "table"), pairs=(pair,))
    (table,) = run_table(table_cfg)
    return table
