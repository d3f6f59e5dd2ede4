"""``rcat-ray study``: the paper's experiment as one job over many pairs, methods and seeds.

1. Every model is attacked once on the choice validation (the head of the training data's val split); with
   ``pairs: paper-rule`` that evaluation decides the pairs.
2. Per pair, one Ray Tune grid sweep over every method's weights (:mod:`rcat_ray.sweep`), each trial judged on
   the same validation; each method's weights chosen by the sweep's rule applied to that method's trials.
3. Each choice fine-tuned again with every seed on Ray Train; every model attacked on the test data (Ray Data,
   the result store: old and new once per pair and seed set).
4. One table over all pairs (:mod:`rcat_ray.study.aggregate`, :mod:`rcat_ray.study.report`).

Everything is reused by identity: a rerun (after Ctrl+C, a lost node, a new seed) restores each pair's Tune
sweep, finds finished fine-tunes at their identity's path and stored tables by key, and computes only what is
missing. Importing this module does not load Ray.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcat_ray.config import AttackConfig, EvaluationSettings, LossConfig, ModelConfig, stable_hash
from rcat_ray.core.progress import log as progress_log
from rcat_ray.errors import ChoiceError
from rcat_ray.evaluate.config import EvaluateConfig, TableConfig, TableEntry, TablePair
from rcat_ray.finetune.run import Parents, check_finetune_inputs, run_finetune
from rcat_ray.study.aggregate import PairResult, over_pairs, pair_result
from rcat_ray.study.config import PAPER_RULE, StudyConfig, StudyPair
from rcat_ray.study.pairs import admitted_pairs
from rcat_ray.sweep.choice import KindChoice, choose_per_kind, trial_label
from rcat_ray.sweep.config import SweepConfig, SweepSpace
from rcat_ray.sweep.judge import ChoiceValidation, check_choice_inputs, choice_settings

__all__ = ["StudyOutcome", "check_study_inputs", "pair_sweep_config", "run_study"]


@dataclass
class StudyOutcome:
    """What a study found and wrote."""

    pairs: list[StudyPair]
    accuracy: dict[str, dict[str, Any]]  # model name -> clean and robust accuracy on the choice validation
    results: list[PairResult]
    summary: dict[str, Any]
    out: Path
    timings: dict[str, float] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)  # model name or checkpoint -> weights' fingerprint
    files: list[Path] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def choice_attack(cfg: StudyConfig) -> AttackConfig:
    """The choice's attack: the configured one, else APGD-CE + APGD-DLR, 50 iterations, on the test's threat
    model (the weights are chosen against the attack they are tested with)."""
    t = cfg.test.attack
    return cfg.choice.attack or AttackConfig(norm=t.norm, eps=t.eps, attacks=("apgd-ce", "apgd-dlr"), n_iter=50)


def pair_sweep_config(cfg: StudyConfig, pair: StudyPair) -> SweepConfig:
    """The grid sweep of one pair. Its name carries a hash of everything its trials train with, so a rerun of
    the same study resumes it and a changed study starts another."""
    base = cfg.finetune_config(cfg.model(pair.old), cfg.model(pair.new), LossConfig())
    space = SweepSpace(losses=cfg.methods, rcat_grid=cfg.rcat_grid, pct_betas=cfg.pct_betas)
    key = stable_hash({"base": base.model_dump(mode="json"), "space": space.model_dump(mode="json")}, 10)
    folder = _slug(f"{pair.old}-{pair.new}")
    return SweepConfig(
        base=base,
        mode="grid",
        space=space,
        asha={"enabled": False},  # the paper trains every grid point fully
        cpus_per_trial=cfg.cpus_per_trial,
        gpus_per_trial=cfg.gpus_per_trial,
        max_concurrent=cfg.max_concurrent,
        tolerance=cfg.tolerance,
        choice=cfg.choice.model_copy(update={"attack": choice_attack(cfg)}),
        compute=cfg.compute,
        name=f"{_slug(cfg.name)}-{folder}-{key}"[-120:],
        storage=f"{cfg.storage}/tune",
        out=f"{cfg.out}/pairs/{folder}/sweep",
        bootstrap=cfg.bootstrap,
    )


def validation_settings(cfg: StudyConfig) -> EvaluationSettings:
    """The choice validation, exactly as every pair's sweep judges its trials (so its tables are shared)."""
    names = list(cfg.models)
    return choice_settings(pair_sweep_config(cfg, StudyPair(old=names[0], new=names[1])))


def check_study_inputs(cfg: StudyConfig) -> dict[tuple[str, str], Parents]:
    """Before any compute: the validation and test selections hold the samples asked for, and every listed
    pair's models load, agree with the data and can be fine-tuned (the paper's rule checks its pairs later)."""
    from rcat_ray.core.sources import selection_size
    from rcat_ray.errors import ConfigError

    names = list(cfg.models)
    check_choice_inputs(pair_sweep_config(cfg, StudyPair(old=names[0], new=names[1])))
    t = cfg.test.data
    have = selection_size(t)
    if t.limit is not None and have < t.limit:
        raise ConfigError(f"test.data.limit is {t.limit} but the selection holds {have} samples")
    if cfg.pairs == PAPER_RULE:  # the pairs are not known yet: every model must be able to be either side
        for i, name in enumerate(names):
            other = names[1] if i == 0 else names[0]
            check_finetune_inputs(pair_sweep_config(cfg, StudyPair(old=other, new=name)).base)
        return {}
    return {(p.old, p.new): check_finetune_inputs(pair_sweep_config(cfg, p).base) for p in cfg.pairs}


def _model_accuracy(cfg: StudyConfig) -> dict[str, dict[str, Any]]:
    """Every model attacked once on the choice validation (stored; a rerun reads it)."""
    from rcat_ray.evaluate.run import raise_if_incomplete, run_evaluate

    settings = validation_settings(cfg)
    models = tuple(cfg.model(n) for n in cfg.models)
    outcomes, _ = run_evaluate(EvaluateConfig(**settings.model_dump(), models=models))
    raise_if_incomplete(outcomes)
    return {n: dict(o.accuracy) for n, o in zip(cfg.models, outcomes, strict=True)}


@dataclass
class PairChoices:
    """One pair's sweep outcome: each method's chosen trial, and the validation that chose."""

    pair: StudyPair
    sweep: str
    choices: dict[str, KindChoice]
    validation: ChoiceValidation
    parents: Parents


def _choose(cfg: StudyConfig, pair: StudyPair, parents: Parents | None) -> PairChoices:
    from rcat_ray.sweep.run import finish_sweep, sweep_trials

    sweep_cfg = pair_sweep_config(cfg, pair)
    parents = parents or check_finetune_inputs(sweep_cfg.base)
    st = sweep_trials(sweep_cfg, resume="auto", parents=parents)
    choices = choose_per_kind(st.trials, new_rob_acc=st.validation.new_rob_acc, tolerance=cfg.tolerance)
    missing = [k for k in cfg.methods if k not in choices]
    if missing:
        raise ChoiceError(
            f"pair {pair.name}: no trial of {', '.join(missing)} finished and was judged; see the sweep's trials "
            f"in {sweep_cfg.out} and its Tune folder {sweep_cfg.storage}/{sweep_cfg.name}"
        )
    try:  # the sweep's own page (every trial, the Pareto fronts), with its overall choice
        finish_sweep(sweep_cfg, st)
    except ChoiceError as err:
        progress_log.info(f"[study] {pair.name}: the sweep's overall choice: {err}")
    return PairChoices(pair, sweep_cfg.name, choices, st.validation, parents)


def _losses(cfg: StudyConfig, pc: PairChoices) -> dict[str, LossConfig]:
    out = {}
    for kind in cfg.methods:
        row = pc.choices[kind].row
        out[kind] = LossConfig(kind=kind, alpha=float(row["alpha"]), beta=float(row["beta"]))
    return out


def _final_finetunes(cfg: StudyConfig, pc: PairChoices, fingerprints: dict[str, str]) -> dict[str, dict[int, Path]]:
    """Each method's choice fine-tuned with every seed (reused when one with the same identity exists)."""
    old, new = cfg.model(pc.pair.old), cfg.model(pc.pair.new)
    tuned: dict[str, dict[int, Path]] = {}
    for kind, loss in _losses(cfg, pc).items():
        tuned[kind] = {}
        for seed in cfg.seeds:
            ft = cfg.finetune_config(old, new, loss, seed)
            progress_log.info(f"[study {cfg.name}] {pc.pair.name}: fine-tune {loss.tag}, seed {seed}")
            done = run_finetune(ft, pc.parents)
            tuned[kind][seed] = done.checkpoint
            fingerprints[str(done.checkpoint)] = done.fingerprint
    return tuned


def _test_config(cfg: StudyConfig, chosen: list[PairChoices], tuned: list[dict[str, dict[int, Path]]]) -> TableConfig:
    """One table config over every (pair, seed): old, new and each method's fine-tune of that seed."""
    pairs = []
    for pc, models in zip(chosen, tuned, strict=True):
        tags = {k: loss.tag for k, loss in _losses(cfg, pc).items()}
        for seed in cfg.seeds:
            entries = tuple(
                TableEntry(
                    label=tags[k],
                    model=ModelConfig(source="checkpoint", name=f"{tags[k]} seed {seed}", path=str(models[k][seed])),
                )
                for k in cfg.methods
            )
            pairs.append(
                TablePair(
                    name=f"{pc.pair.name}, seed {seed}",
                    old=cfg.model(pc.pair.old),
                    new=cfg.model(pc.pair.new),
                    finetuned=entries,
                    reference=tags["rcat"],
                )
            )
    t = cfg.test
    return TableConfig(
        data=t.data,
        attack=t.attack,
        chunk_size=t.chunk_size,
        store=cfg.store,
        compute=cfg.compute,
        bootstrap=cfg.bootstrap,
        out=f"{cfg.out}/tables",
        pairs=tuple(pairs),
    )


def _roles(cfg: StudyConfig, pc: PairChoices, table_rows: list[str]) -> dict[str, str]:
    """Role -> the row label the table gave it (old and new first, as the table lists them)."""
    tags = {k: loss.tag for k, loss in _losses(cfg, pc).items()}
    return {"old": table_rows[0], "new": table_rows[1], **{k: tags[k] for k in cfg.methods}}


def run_study(cfg: StudyConfig, parents: dict[tuple[str, str], Parents] | None = None) -> StudyOutcome:
    """Run (or resume) the whole study and write its tables and page into ``cfg.out``.

    ``parents``: what :func:`check_study_inputs` returned (the CLI checks before Ray starts).
    """
    from rcat_ray.evaluate.run import run_table
    from rcat_ray.runtime.cluster import ensure_ray
    from rcat_ray.study.report import write_study

    parents = parents if parents is not None else check_study_inputs(cfg)
    ensure_ray(cfg.compute)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    progress_log.info(f"[study {cfg.name}] {len(cfg.models)} models on the choice validation")
    accuracy = _model_accuracy(cfg)
    pairs = list(cfg.pairs) if cfg.pairs != PAPER_RULE else admitted_pairs(accuracy)
    if not pairs:
        raise ChoiceError(
            "the paper's rule admits no pair: no model is better than another on both clean and robust accuracy "
            "on the choice validation; list the pairs instead"
        )
    progress_log.info(f"[study {cfg.name}] {len(pairs)} pair(s): {', '.join(p.name for p in pairs)}")
    times["models on validation"] = time.perf_counter() - t0

    t = time.perf_counter()
    chosen = []
    for i, pair in enumerate(pairs, start=1):
        progress_log.info(f"[study {cfg.name}] pair {i}/{len(pairs)} {pair.name}: grid sweep")
        chosen.append(_choose(cfg, pair, parents.get((pair.old, pair.new))))
    times["sweeps and choices"] = time.perf_counter() - t

    t = time.perf_counter()
    fingerprints: dict[str, str] = {}
    for pc in chosen:
        fingerprints[pc.pair.old] = pc.parents.old.fingerprint
        fingerprints[pc.pair.new] = pc.parents.new.fingerprint
    tuned = [_final_finetunes(cfg, pc, fingerprints) for pc in chosen]
    times["final fine-tunes"] = time.perf_counter() - t

    t = time.perf_counter()
    progress_log.info(f"[study {cfg.name}] testing {len(pairs)} pair(s) x {len(cfg.seeds)} seed(s)")
    tables = run_table(_test_config(cfg, chosen, tuned))
    times["test evaluation"] = time.perf_counter() - t

    results = []
    per_seed = len(cfg.seeds)
    for i, pc in enumerate(chosen):
        pair_tables = tables[i * per_seed : (i + 1) * per_seed]
        roles = _roles(cfg, pc, [r.label for r in pair_tables[0].rows])
        result = pair_result(pc.pair.name, roles, list(cfg.seeds), pair_tables, cfg.bootstrap)
        for kind, c in pc.choices.items():
            result.chosen[kind] = {
                "label": trial_label(c.row),
                "alpha": float(c.row["alpha"]),
                "beta": float(c.row["beta"]),
                "trial_id": str(c.row["trial_id"]),
                "meets_bar": bool(c.eligible),
                "val_s_nfr": float(c.row["val_s_nfr"]),
                "val_rob_acc": float(c.row["val_rob_acc"]),
            }
        result.validation = {"description": pc.validation.describe(), "new_rob_acc": pc.validation.new_rob_acc}
        result.sweep = pc.sweep
        results.append(result)
    times["total"] = time.perf_counter() - t0
    outcome = StudyOutcome(
        pairs, accuracy, results, over_pairs(results), Path(cfg.out).expanduser(), times, fingerprints
    )
    outcome.files = write_study(cfg, outcome, tables)
    return outcome
