"""Ray Tune sweeps of the fine-tuning weights (alpha, beta), training eps, learning rate and epochs.

A trial that fits on one device trains inside the trial process (RAY_NOTES pattern A, the cheap one); a
trial configured with several workers runs a TorchTrainer and forwards its metrics to Tune (pattern B).
Both run the same loop (:func:`rcat_ray.finetune.ray_train.finetune_loop`), which reports validation flips
against the old model every epoch (a cheap attack on a small subset), so ASHA can stop trials early and
the user sees progress.

The choice is not made on those cheap numbers: a weak attack rewards models that the test attack then
breaks. Once Tune is done, every trial that ran all its epochs is written as a checkpoint under
``<out>/trials/`` and, with old and new, evaluated through the flip engine (Ray Data, the result store) with
the test-strength attack on the head of the validation split (``SweepConfig.selection``: APGD-CE +
APGD-DLR, 50 iterations, 2,000 samples by default). Old and new are attacked once and cached by
fingerprint like any other table. The selection rule (:mod:`rcat_ray.sweep.choice`) then reads those strong
metrics, with their bootstrap CIs and N; the chosen model is, when test settings are given, evaluated on
them into the paper-style table. ``selection.enabled: false`` restores the choice on the last per-epoch
validation.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import ray
import ray.tune
import torch
import yaml

from rcat_ray.config import AttackConfig, EvaluationSettings, ModelConfig, parse_config
from rcat_ray.core.models import LoadedModel
from rcat_ray.core.sources import selection_size
from rcat_ray.core.validation import per_model_table
from rcat_ray.errors import ConfigError, SweepFailedError, SweepInterruptedError
from rcat_ray.evaluate.config import EvaluateConfig
from rcat_ray.evaluate.paper_table import TableRow
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.identity import IdentityInputs, finetune_identity
from rcat_ray.finetune.ray_train import (
    STATE_FILE,
    Parents,
    _write_final,
    check_finetune_inputs,
    finetune_loop,
    train_run,
    validation_setup,
)
from rcat_ray.store.result_store import write_file_atomic
from rcat_ray.sweep.choice import pareto_front, select_trial
from rcat_ray.sweep.config import SweepConfig
from rcat_ray.sweep.search_space import expand, paper_grid, random_trials

TRIAL_KEYS = ("kind", "alpha", "beta", "train_eps", "lr", "epochs")

#: The metrics the selection reads from each comparison against the old model (``val_<metric>`` columns,
#: each with ``_ci_low``, ``_ci_high`` and ``_n``).
SELECTION_METRICS = ("s_nfr", "r_nfr", "nfr", "rob_acc", "acc")

progress_log = logging.getLogger("rcat_ray.core.progress")


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
        # the Ray node the trial ran on (Tune's own node_ip is the same for every node of one machine)
        ray.tune.report({**metrics, "node_id": ray.get_runtime_context().get_node_id()}, checkpoint=ck)


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
    raw["output"] = None  # every trial writes its own files (<out>/<name>-<identity>.pt), never the base's path
    return parse_config(FinetuneConfig, raw)


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
    if cfg.num_workers <= 1:
        finetune_loop(cfg, TuneSession(cfg), inputs=inputs)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    identity = finetune_identity(cfg, inputs)
    loop_config = {"finetune": cfg.model_dump(mode="json"), "inputs": inputs.to_json()}
    run_name = f"{identity.run_name(cfg)}-{config['sweep']}-{trial_id}"
    train_run(cfg, identity, loop_config, callbacks=[TuneReportCallback()], run_name=run_name).fit()


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


def _storage(cfg: SweepConfig) -> str:
    return str(Path(cfg.storage).expanduser().resolve()) if "://" not in cfg.storage else cfg.storage


#: CPUs the driver of a trial with workers holds while its Ray Train run trains (Tune refuses 0).
TRIAL_DRIVER_CPUS = 0.01


def check_trial_fits(cfg: SweepConfig) -> None:
    """Refuse a sweep whose trials with workers can never start: the trial's own share plus its Train workers must
    fit the cluster's CPUs, or Tune waits forever with the trial holding its share (2 workers of 1 CPU on 2 CPUs)."""
    base = cfg.base
    if base.num_workers <= 1 or not ray.is_initialized():
        return
    need = TRIAL_DRIVER_CPUS + base.num_workers * base.cpus_per_worker
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if need > have + 1e-9:
        fit = (have - TRIAL_DRIVER_CPUS) / base.num_workers
        raise ConfigError(
            f"a trial trains on {base.num_workers} workers of {base.cpus_per_worker:g} CPU, plus {TRIAL_DRIVER_CPUS} "
            f"for the trial itself ({need:g} CPUs), but the cluster has {have:g}: set base.cpus_per_worker to at most "
            f"{int(fit * 100) / 100:g} or use fewer workers"
        )


def _max_concurrent(cfg: SweepConfig) -> int | None:
    """Trials at once: the configured number, else, for trials with workers, as many as the cluster's CPUs hold
    with their workers (Tune counts only a trial's 0.01 CPU, so it would start every trial, and their worker
    groups would wait for each other's CPUs until Ray Train gives up)."""
    base = cfg.base
    if cfg.max_concurrent is not None or base.num_workers <= 1 or not ray.is_initialized():
        return cfg.max_concurrent
    have = float(ray.cluster_resources().get("CPU", 0.0))
    return max(1, int((have + 1e-9) // (TRIAL_DRIVER_CPUS + base.num_workers * base.cpus_per_worker)))


def build_tuner(cfg: SweepConfig, *, resume: bool, inputs: IdentityInputs) -> ray.tune.Tuner:
    """A new Tuner, or the interrupted one restored from storage (finished trials are not rerun). ``inputs``:
    the fingerprints of the parents and data every trial trains from (checked by the trials)."""
    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    if cfg.base.num_workers > 1:  # pattern B: the trial driver only coordinates; workers bring their own
        resources = {"cpu": TRIAL_DRIVER_CPUS}
    trainable = ray.tune.with_resources(sweep_trainable, resources)
    path = f"{_storage(cfg)}/{cfg.name}"
    if resume:
        if not ray.tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"no sweep to resume at {path}")
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)

    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base = {"base": cfg.base.model_dump(mode="json"), "sweep": cfg.name, "inputs": inputs.to_json()}
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
            max_concurrent_trials=_max_concurrent(cfg),
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.name, storage_path=_storage(cfg), failure_config=ray.tune.FailureConfig(max_failures=1)
        ),
    )


def trial_table(results: Any) -> pd.DataFrame:
    """One row per trial: its settings, its last per-epoch metrics, epochs run, and its Tune checkpoint.

    The loop reports its cheap validation as ``val_*``; here those become ``epoch_val_*``, so that ``val_*``
    always means what the selection rule read (see :class:`SelectionValidation`) and a report can show both.
    """
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
            "node_id": metrics.get("node_id"),
            **{f"epoch_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()
               if k.startswith(("val_", "train_loss"))},
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
    """The new model's robust accuracy on the per-epoch validation (cheap attack): the bar of the rule when
    ``selection.enabled`` is false."""
    val_split, val_attack = validation_setup(base)
    table = per_model_table(new.module.eval(), val_split, val_attack, new.num_classes, torch.device("cpu"))
    return float(table.column("robust").to_numpy(zero_copy_only=False).astype(bool).mean())


def _raise_if_all_failed(trials: pd.DataFrame) -> None:
    """A sweep whose every trial errored has no metrics to choose on: say why, with the first trial's error."""
    failed = trials["error"].notna() if "error" in trials else pd.Series(False, index=trials.index)
    has_metrics = pd.Series(False, index=trials.index)
    for column in ("epoch_val_s_nfr", "val_s_nfr"):
        if column in trials:
            has_metrics |= trials[column].notna()
    if len(trials) and not (has_metrics & ~failed).any():
        first = trials[failed].iloc[0] if failed.any() else trials.iloc[0]
        error = str(first.get("error") or "no trial reported validation metrics").strip()
        lines = [line for line in error.splitlines() if line.strip()]
        # Ray wraps the trial's exception in a traceback; its last line is the error itself
        raise SweepFailedError(f"all {len(trials)} trials failed; the first ({first['trial_id']}): {lines[-1]}")


# --------------------------------------------------------------------------------------------------
# Judging the finished trials: which validation the selection rule reads


@dataclass
class SelectionValidation:
    """Which validation the selection rule read: the samples (and their N), the attack, and the new model's
    metrics on them (its robust accuracy is the rule's bar).

    ``source`` is ``"selection"`` (the test-strength attack through the flip engine, values with bootstrap
    CIs) or ``"per-epoch"`` (the cheap validation of each trial's last epoch; ``selection.enabled: false``).
    ``rows`` are the stored comparisons against the old model (old, new, every judged trial) behind the
    validation table; ``labels`` maps trial ids to their row labels.
    """

    source: Literal["selection", "per-epoch"]
    attack: AttackConfig
    data: dict[str, Any]  # the split's description (dataset, split, N, sample-id range, fingerprint)
    n: int
    new: dict[str, dict[str, Any]]  # metric -> {"value", "ci_low", "ci_high", "n"}
    rows: list[TableRow] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def new_rob_acc(self) -> float:
        return float(self.new["rob_acc"]["value"])

    def describe(self) -> str:
        """One line for reports and logs: which validation, which attack, on how many samples."""
        a = self.attack
        what = "selection validation" if self.source == "selection" else "per-epoch validation (last epoch)"
        attacks = " + ".join(x.upper() for x in a.cascade)
        return (
            f"{what}: {attacks}, {a.n_iter} iterations, {a.norm} eps {a.eps:g}, on N = {self.n} samples "
            f"({self.data.get('dataset')} {self.data.get('split')} split, sample ids {self.data.get('sample_id_min')}"
            f"-{self.data.get('sample_id_max')})"
        )

    def to_dict(self) -> dict[str, Any]:
        """What best.yaml records about the validation that chose."""
        return {
            "source": self.source,
            "description": self.describe(),
            "samples": self.n,
            "data": self.data,
            "attack": self.attack.model_dump(mode="json"),
            "new_model": {f"val_{m}": v for m, v in self.new.items()},
        }


def selection_settings(cfg: SweepConfig) -> EvaluationSettings:
    """Where and how finished trials are judged: the head of the base data's val split (the part the training
    split never sees), with ``selection.attack``, else APGD-CE + APGD-DLR, 50 iterations, at the test eps when
    the sweep has test settings (the choice is judged on the threat model it is tested on), else the training eps."""
    sel = cfg.selection
    data = cfg.base.data.model_copy(update={"split": "val", "offset": 0, "limit": sel.samples})
    eps = cfg.test.attack.eps if cfg.test is not None else cfg.base.train_attack.eps
    attack = sel.attack or AttackConfig(eps=eps, attacks=("apgd-ce", "apgd-dlr"), n_iter=50)
    # adversarial images are for reports on test data; the validation tables only need their rows
    return EvaluationSettings(data=data, attack=attack, chunk_size=sel.chunk_size, store=cfg.base.store,
                              compute=sel.compute, save_adversarial=False)  # fmt: skip


def check_selection_inputs(cfg: SweepConfig) -> int | None:
    """Refuse, before any trial trains, a selection that asks for more validation samples than there are:
    a smaller N than requested would silently widen every CI the choice rests on. Rows are counted from the
    files' metadata (no image is decoded); returns the count, None when selection is off."""
    if not cfg.selection.enabled:
        return None
    data = selection_settings(cfg).data
    n = selection_size(data)
    if n < cfg.selection.samples:
        raise ConfigError(
            f"selection.samples is {cfg.selection.samples} but the val split of {data.name} holds {n} "
            "samples; lower selection.samples or raise base.data.val_size"
        )
    return n


def completed_trials(cfg: SweepConfig, trials: pd.DataFrame) -> pd.Series:
    """Trials that ran all their epochs without error and left a checkpoint. A trial ASHA stopped is not
    judged: it is a partly trained model, and not spending the strong attack on it is ASHA's point."""
    done = []
    for _, row in trials.iterrows():
        planned = row.get("epochs")
        planned = int(planned) if planned is not None and pd.notna(planned) else cfg.base.epochs
        runs = row.get("epochs_run")
        done.append(
            pd.isna(row.get("error")) and pd.notna(row.get("checkpoint")) and pd.notna(runs) and int(runs) >= planned
        )
    return pd.Series(done, index=trials.index, dtype=bool)


def trial_config(cfg: SweepConfig, row: pd.Series, out: Path | None = None) -> FinetuneConfig:
    """The fine-tuning config a trial ran with (named ``<sweep>-<trial id>``), writing into ``out`` if given."""
    settings = {k: row[k] for k in TRIAL_KEYS if k in row and pd.notna(row[k])}
    trial_cfg = apply_trial(cfg.base, settings, name=f"{cfg.name}-{row['trial_id']}")
    return trial_cfg if out is None else trial_cfg.model_copy(update={"out": str(out)})


def write_trial_model(cfg: SweepConfig, row: pd.Series, parents: Parents, out: Path) -> Path:
    """A trial's final Tune checkpoint as a self-describing model checkpoint (with its manifest) in ``out``,
    so the flip engine loads it like any other model, fingerprinted by its weights."""
    trial_cfg = trial_config(cfg, row, out)
    with ray.tune.Checkpoint(row["checkpoint"]).as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    return _write_final(trial_cfg, state, list(state.get("history", [])), parents).checkpoint


def _metric_columns(summaries: list[dict[str, Any] | None]) -> dict[str, Any]:
    """``val_<m>``, ``val_<m>_ci_low``, ``val_<m>_ci_high``, ``val_<m>_n`` from comparison summaries (None for a
    trial that was not judged)."""
    cols: dict[str, Any] = {}
    for m in SELECTION_METRICS:
        entries = [(s or {}).get("metrics", {}).get(m, {}) for s in summaries]
        for part in ("value", "ci_low", "ci_high"):
            name = f"val_{m}" if part == "value" else f"val_{m}_{part}"
            cols[name] = [float("nan") if e.get(part) is None else float(e[part]) for e in entries]
        cols[f"val_{m}_n"] = pd.array([e.get("n") for e in entries], dtype="Int64")
    return cols


def judge_on_selection(
    cfg: SweepConfig, trials: pd.DataFrame, parents: Parents, out: Path
) -> tuple[pd.DataFrame, SelectionValidation]:
    """Write every completed trial's model under ``<out>/trials/`` and evaluate old, new and each of them with
    the selection settings through the flip engine (Ray Data, the result store: old and new are attacked
    once and reused by fingerprint); each trial gets its comparison against the old model as ``val_*``."""
    from rcat_ray.evaluate.comparison import compare_stored
    from rcat_ray.evaluate.run import raise_if_incomplete, run_evaluate
    from rcat_ray.sweep.choice import trial_label

    done = completed_trials(cfg, trials)
    if not done.any():
        raise SweepFailedError(
            f"none of the {len(trials)} trials ran all its epochs without error; there is no model to judge"
        )
    settings = selection_settings(cfg)
    folder = out / "trials"
    paths: dict[str, Path] = {}
    labels: dict[str, str] = {}
    for _, row in trials[done].iterrows():
        tid = str(row["trial_id"])
        paths[tid] = write_trial_model(cfg, row, parents, folder)
        labels[tid] = f"{trial_label(row)} {tid}"
    a = settings.attack
    progress_log.info(
        f"[sweep {cfg.name}] judging {len(paths)} finished trial(s) against old and new: "
        f"{' + '.join(x.upper() for x in a.cascade)}, {a.n_iter} iterations, eps {a.eps:g}, "
        f"on {settings.data.limit} validation samples"
    )
    models = (
        cfg.base.old,
        cfg.base.new,
        *(ModelConfig(source="checkpoint", name=p.stem, label=labels[t], path=str(p)) for t, p in paths.items()),
    )
    eval_cfg = EvaluateConfig(**{k: getattr(settings, k) for k in EvaluationSettings.model_fields}, models=models)
    outcomes, prepared = run_evaluate(eval_cfg)
    raise_if_incomplete(outcomes)
    plans, names = prepared.plans, list(prepared.split.class_names)
    comps = [compare_stored(prepared.store, plans[0].key, p.key, cfg.bootstrap, class_names=names) for p in plans]

    old_label, new_label = cfg.base.old.display_name or "old", cfg.base.new.display_name or "new"
    if old_label == new_label:
        old_label, new_label = f"{old_label} (old)", f"{new_label} (new)"
    row_labels = [old_label, new_label, *labels.values()]
    rows = [
        TableRow(label, c.summary, c.flips, is_old=i == 0, comparison_key=c.key)
        for i, (label, c) in enumerate(zip(row_labels, comps, strict=True))
    ]
    judged = dict(zip(paths, zip(comps[2:], plans[2:], strict=True), strict=True))
    ids = [str(t) for t in trials["trial_id"]]
    trials = trials.assign(
        judged=[t in judged for t in ids],
        model=[str(paths[t]) if t in paths else None for t in ids],
        val_table=[judged[t][1].key if t in judged else None for t in ids],
        val_comparison=[judged[t][0].key if t in judged else None for t in ids],
        **_metric_columns([judged[t][0].summary if t in judged else None for t in ids]),
    )
    new_metrics = {m: dict(comps[1].summary["metrics"][m]) for m in SELECTION_METRICS}
    validation = SelectionValidation("selection", a, prepared.split.describe(), len(prepared.split), new_metrics,
                                     rows, labels)  # fmt: skip
    return trials, validation


def judge_on_epochs(
    cfg: SweepConfig, trials: pd.DataFrame, parents: Parents
) -> tuple[pd.DataFrame, SelectionValidation]:
    """``selection.enabled: false``: the rule reads each trial's last per-epoch validation, as it used to (no
    CIs; the bar is the new model's robust accuracy under the same cheap attack)."""
    val_split, val_attack = validation_setup(cfg.base)
    new_rob = new_model_val_rob_acc(cfg.base, parents.new)
    n = len(val_split)
    cols: dict[str, Any] = {"judged": trials.get("epoch_val_s_nfr", pd.Series(index=trials.index)).notna()}
    for m in SELECTION_METRICS:
        values = trials.get(f"epoch_val_{m}", pd.Series(float("nan"), index=trials.index)).astype(float)
        cols[f"val_{m}"] = values
        cols[f"val_{m}_n"] = pd.array([n if pd.notna(v) else None for v in values], dtype="Int64")
    new = {"rob_acc": {"value": new_rob, "ci_low": None, "ci_high": None, "n": n}}
    validation = SelectionValidation("per-epoch", val_attack, val_split.describe(), n, new)
    return trials.assign(**cols), validation


# --------------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepTrials:
    """A finished sweep before the choice: every trial with its per-epoch and selection metrics, and the
    validation that judged them (what a caller needs to apply its own choice, e.g. one per loss kind)."""

    trials: pd.DataFrame
    validation: SelectionValidation
    parents: Parents
    out: Path


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
    validation: SelectionValidation | None = None  # which validation chose (attack, N, the new model's bar)
    validation_table: Any = None  # every judged trial against old on the selection validation, chosen as reference


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


def sweep_trials(cfg: SweepConfig, *, resume: bool = False, parents: Parents | None = None) -> SweepTrials:
    """Run (or resume) the Tune sweep, then judge the finished trials on the selection validation.

    ``parents``: the models as already checked by the caller (before Ray started); checked here otherwise.
    """
    parents = parents or check_finetune_inputs(cfg.base)
    check_selection_inputs(cfg)  # before any trial trains
    check_trial_fits(cfg)
    with _sigint_restored():
        results = build_tuner(cfg, resume=resume, inputs=parents.inputs).fit()
    _raise_if_unfinished(cfg, results)
    trials = trial_table(results)
    _raise_if_all_failed(trials)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.selection.enabled:
        trials, validation = judge_on_selection(cfg, trials, parents, out)
    else:
        trials, validation = judge_on_epochs(cfg, trials, parents)
    return SweepTrials(trials, validation, parents, out)


def _entry(row: pd.Series, metric: str) -> dict[str, Any]:
    """One selection metric of a trial with its CI and N (None where the validation has no CI)."""

    def num(key: str, cast: Any = float) -> Any:
        v = row.get(key)
        return None if v is None or pd.isna(v) else cast(v)

    return {"value": num(f"val_{metric}"), "ci_low": num(f"val_{metric}_ci_low"),
            "ci_high": num(f"val_{metric}_ci_high"), "n": num(f"val_{metric}_n", int)}  # fmt: skip


def finish_sweep(cfg: SweepConfig, st: SweepTrials) -> SweepOutcome:
    """Choose by the rule on the selection metrics, write best.yaml, the validation table, the plots and
    the report, and (with test settings) test the chosen model through the flip engine."""
    from rcat_ray.evaluate.paper_table import build_pair_table, to_csv, to_markdown
    from rcat_ray.sweep.choice import trial_label
    from rcat_ray.sweep.report import write_sweep_outputs

    trials, val, out = st.trials, st.validation, st.out
    chosen = select_trial(trials, new_rob_acc=val.new_rob_acc, tolerance=cfg.tolerance)
    if pd.notna(chosen.get("model")):  # judged on the selection validation: its model is under trials/
        checkpoint = Path(chosen["model"])
        chosen_cfg = trial_config(cfg, chosen, checkpoint.parent)
    else:  # per-epoch selection: only the chosen trial is written, into out/
        chosen_cfg = trial_config(cfg, chosen, out)
        checkpoint = write_trial_model(cfg, chosen, st.parents, out)
    best = {
        "rule": f"lowest val_s_nfr among trials with val_rob_acc >= {val.new_rob_acc:.4f} - {cfg.tolerance} "
        "(the new model's validation robust accuracy minus the tolerance; ties: higher val_rob_acc, "
        "then lower trial id)",
        "validation": val.to_dict(),
        "new_model_val_rob_acc": val.new_rob_acc,
        "trial_id": chosen["trial_id"],
        "label": trial_label(chosen),
        "metrics": {f"val_{m}": _entry(chosen, m) for m in SELECTION_METRICS},
        "epoch_metrics": {
            k: float(chosen[k]) for k in trials.columns if k.startswith("epoch_val_") and pd.notna(chosen[k])
        },
        "checkpoint": str(checkpoint),
        "finetune": chosen_cfg.model_dump(mode="json"),
    }
    best_yaml = out / "best.yaml"
    write_file_atomic(best_yaml, yaml.safe_dump(best, sort_keys=False))
    trials = trials.assign(pareto_r_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_r_nfr"),
                           pareto_s_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_s_nfr"),
                           chosen=trials["trial_id"] == chosen["trial_id"])  # fmt: skip
    outcome = SweepOutcome(trials, chosen, val.new_rob_acc, best_yaml, checkpoint, out, validation=val)
    if val.rows:
        b = cfg.bootstrap
        outcome.validation_table = build_pair_table(
            f"{cfg.name}, {val.describe()}", val.rows, reference=val.labels[str(chosen["trial_id"])],
            n_bootstrap=b.n_resamples, confidence=b.confidence, seed=b.seed,
        )  # fmt: skip
        (out / "selection").mkdir(exist_ok=True)
        write_file_atomic(out / "selection" / "table.md", to_markdown([outcome.validation_table]))
        write_file_atomic(out / "selection" / "table.csv", to_csv([outcome.validation_table]))
    if cfg.test is not None:
        outcome.table = _evaluate_on_test(cfg, chosen_cfg, checkpoint, out)
    write_sweep_outputs(cfg, outcome)
    return outcome


def run_sweep(cfg: SweepConfig, *, resume: bool = False, parents: Parents | None = None) -> SweepOutcome:
    """Run (or resume) the sweep, judge the finished trials, choose one, write its model, the tables and plots.

    ``parents``: the models as already checked by the caller (before Ray started); checked here otherwise.
    """
    return finish_sweep(cfg, sweep_trials(cfg, resume=resume, parents=parents))


def _evaluate_on_test(cfg: SweepConfig, chosen_cfg: FinetuneConfig, checkpoint: Path, out: Path) -> Any:
    """The chosen model through the flip engine on the test settings, in the paper-style table."""
    from rcat_ray.evaluate.config import TableConfig, TableEntry, TablePair
    from rcat_ray.evaluate.run import run_table

    label = chosen_cfg.loss.tag
    entry = TableEntry(
        label=label, model=ModelConfig(source="checkpoint", name=label, label=label, path=str(checkpoint))
    )
    pair = TablePair(name=f"{cfg.name}: chosen {label}", old=cfg.base.old, new=cfg.base.new, finetuned=(entry,))
    table_cfg = TableConfig(**cfg.test.model_dump(), bootstrap=cfg.bootstrap, out=str(out / "table"), pairs=(pair,))
    (table,) = run_table(table_cfg)
    return table
