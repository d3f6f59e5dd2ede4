"""``rcat-ray sweep``: run the Tune sweep, judge its finished trials, choose one, write its model and reports.

The entry point the CLI, jobs and bench call. Importing it does not load Ray: the Tune adapter
(:mod:`rcat_ray.sweep.ray_tune`) is imported only when a sweep runs. The choice (:mod:`rcat_ray.sweep.choice`)
reads the judged metrics with their bootstrap CIs and N (:mod:`rcat_ray.sweep.judge`); with test settings the
chosen model is then evaluated into the paper-style table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from rcat_ray.config import ModelConfig
from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.run import Parents, check_finetune_inputs
from rcat_ray.sweep.choice import choose_trial, pareto_front
from rcat_ray.sweep.config import Resume, SweepConfig
from rcat_ray.sweep.judge import (
    CHOICE_METRICS,
    ChoiceValidation,
    check_choice_inputs,
    judge_on_choice_validation,
    judge_on_epochs,
)
from rcat_ray.sweep.trials import raise_if_all_failed, trial_config, write_trial_model

__all__ = ["SweepOutcome", "SweepTrials", "finish_sweep", "run_sweep", "sweep_trials"]


@dataclass
class SweepTrials:
    """A finished sweep before the choice: every trial with its per-epoch and choice metrics, and the
    validation that judged them (what a caller needs to apply its own choice, e.g. one per loss kind)."""

    trials: pd.DataFrame
    validation: ChoiceValidation
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
    validation: ChoiceValidation | None = None  # which validation chose (attack, N, the new model's bar)
    validation_table: Any = None  # every judged trial against old on the choice validation, chosen as reference


def sweep_trials(cfg: SweepConfig, *, resume: Resume = False, parents: Parents | None = None) -> SweepTrials:
    """Run (or resume) the Tune sweep, then judge the finished trials on the choice validation.

    ``parents``: the models as already checked by the caller (before Ray started); checked here otherwise.
    """
    parents = parents or check_finetune_inputs(cfg.base)
    check_choice_inputs(cfg)  # before any trial trains
    from rcat_ray.sweep.ray_tune import tune_trials

    trials = tune_trials(cfg, resume=resume, inputs=parents.inputs)
    raise_if_all_failed(trials)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.choice.enabled:
        trials, validation = judge_on_choice_validation(cfg, trials, parents, out)
    else:
        trials, validation = judge_on_epochs(cfg, trials, parents)
    return SweepTrials(trials, validation, parents, out)


def _entry(row: pd.Series, metric: str) -> dict[str, Any]:
    """One choice metric of a trial with its CI and N (None where the validation has no CI)."""

    def num(key: str, cast: Any = float) -> Any:
        v = row.get(key)
        return None if v is None or pd.isna(v) else cast(v)

    return {
        "value": num(f"val_{metric}"),
        "ci_low": num(f"val_{metric}_ci_low"),
        "ci_high": num(f"val_{metric}_ci_high"),
        "n": num(f"val_{metric}_n", int),
    }


def finish_sweep(cfg: SweepConfig, st: SweepTrials) -> SweepOutcome:
    """Choose by the rule on the choice metrics, write best.yaml, the validation table, the plots and
    the report, and (with test settings) test the chosen model through the flip engine."""
    from rcat_ray.evaluate.paper_table import build_pair_table, to_csv, to_markdown
    from rcat_ray.sweep.choice import trial_label
    from rcat_ray.sweep.report import write_sweep_outputs

    trials, val, out = st.trials, st.validation, st.out
    chosen = choose_trial(trials, new_rob_acc=val.new_rob_acc, tolerance=cfg.tolerance)
    if pd.notna(chosen.get("model")):  # judged on the choice validation: its model is under trials/
        checkpoint = Path(chosen["model"])
        chosen_cfg = trial_config(cfg, chosen, checkpoint.parent)
    else:  # chosen on the per-epoch validation: only the chosen trial is written, into out/
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
        "metrics": {f"val_{m}": _entry(chosen, m) for m in CHOICE_METRICS},
        "epoch_metrics": {
            k: float(chosen[k]) for k in trials.columns if k.startswith("epoch_val_") and pd.notna(chosen[k])
        },
        "checkpoint": str(checkpoint),
        "finetune": chosen_cfg.model_dump(mode="json"),
    }
    best_yaml = out / "best.yaml"
    write_file_atomic(best_yaml, yaml.safe_dump(best, sort_keys=False))
    trials = trials.assign(
        pareto_r_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_r_nfr"),
        pareto_s_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_s_nfr"),
        chosen=trials["trial_id"] == chosen["trial_id"],
    )
    outcome = SweepOutcome(trials, chosen, val.new_rob_acc, best_yaml, checkpoint, out, validation=val)
    if val.rows:
        b = cfg.bootstrap
        outcome.validation_table = build_pair_table(
            f"{cfg.name}, {val.describe()}",
            val.rows,
            reference=val.labels[str(chosen["trial_id"])],
            n_bootstrap=b.n_resamples,
            confidence=b.confidence,
            seed=b.seed,
        )
        (out / "choice").mkdir(exist_ok=True)
        write_file_atomic(out / "choice" / "table.md", to_markdown([outcome.validation_table]))
        write_file_atomic(out / "choice" / "table.csv", to_csv([outcome.validation_table]))
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
    table_cfg = TableConfig(
        **cfg.test.model_dump(),
        bootstrap=cfg.bootstrap,
        confirm=cfg.confirm,
        confirm_attack=cfg.confirm_attack,
        out=str(out / "table"),
        pairs=(pair,),
    )
    (table,) = run_table(table_cfg)
    return table
