"""The two user-facing workflows, evaluate and compare, as plain functions of validated configs.

Order matters and is the point of this module: everything that can be wrong with the input (data,
models, their agreement, the store) is checked before Ray starts or any attack runs, and nothing is
written to the store until then.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from rcat_ray.comparison import Comparison, compare_stored
from rcat_ray.config import CompareConfig, EvaluateConfig, EvaluationSettings, ModelConfig, TableConfig
from rcat_ray.core.data import Split, load_split
from rcat_ray.core.models import LoadedModel, check_model_source, load_model
from rcat_ray.evaluation import EvaluationPlan, validate_pair_inputs
from rcat_ray.store import ResultStore, write_file_atomic


class IncompleteRunError(RuntimeError):
    """The run stopped with work left (``max_new_chunks``); the same command continues it (CLI exit 3)."""


def raise_if_incomplete(outcomes: list) -> None:
    """Say what remains of an incomplete evaluation, as an error the CLI turns into exit status 3."""
    left = [o for o in outcomes if not o.complete]
    if left:
        remaining = ", ".join(f"{o.model_name}: {o.n_chunks - o.chunks_cached - o.chunks_computed} of "
                              f"{o.n_chunks} chunks" for o in left)  # fmt: skip
        raise IncompleteRunError(f"incomplete: {remaining} remain; run the same command again to continue")


def distinct_names(models: list[LoadedModel]) -> list[LoadedModel]:
    """Models that share a display name in one run get a suffix (their fingerprint, else their position), so a
    table, a report or a log line never shows two rows under one name."""
    counts = Counter(m.name for m in models)
    fingerprints = Counter((m.name, m.fingerprint) for m in models)
    out = []
    for i, m in enumerate(models):
        if counts[m.name] == 1:
            out.append(m)
            continue
        suffix = m.fingerprint[:8] if fingerprints[(m.name, m.fingerprint)] == 1 else f"#{i + 1}"
        out.append(dataclasses.replace(m, name=f"{m.name} [{suffix}]"))
    return out


@dataclass
class Prepared:
    """Validated inputs of a run: the store, the samples, the models and their plans."""

    store: ResultStore
    split: Split
    models: list[LoadedModel]
    plans: list[EvaluationPlan]


def prepare(settings: EvaluationSettings, models: list[ModelConfig | LoadedModel]) -> Prepared:
    """Load and cross-check everything a run needs; raises a clear error before any compute.

    ``models`` may mix configs and models already in memory (the Python API, the demo). A RobustBench
    source without a threat model takes the attack's norm (Linf or L2 zoo).
    """
    models = [
        m.model_copy(update={"threat_model": settings.attack.norm})
        if isinstance(m, ModelConfig) and m.source == "robustbench" and m.threat_model is None
        else m
        for m in models
    ]
    for m in models:
        if not isinstance(m, LoadedModel):
            check_model_source(m, data_name=settings.data.name)
    split = load_split(settings.data)
    loaded = [
        m if isinstance(m, LoadedModel)
        else load_model(m, num_classes=split.num_classes, input_shape=split.input_shape, data_name=settings.data.name)
        for m in models
    ]  # fmt: skip
    validate_pair_inputs(loaded, split)
    loaded = distinct_names(loaded)
    store = ResultStore(settings.store)
    store.check_writable()
    plans = [EvaluationPlan(m, split, settings.attack, settings.chunk_size) for m in loaded]
    return Prepared(store, split, loaded, plans)


def run_evaluate(cfg: EvaluateConfig, *, extra_models: list[LoadedModel] | None = None):
    """Evaluate every model of the config (and any in-memory ones) once; returns (outcomes, prepared).

    Ray is started only when some chunk must be computed: what is stored is reused without it.
    """
    from rcat_ray.distributed.evaluate import evaluate_plans

    prepared = prepare(cfg, [*cfg.models, *(extra_models or [])])
    outcomes = evaluate_plans(prepared.plans, prepared.store, cfg)
    return _with_accuracy(outcomes, prepared), prepared


def _with_accuracy(outcomes: list, prepared: Prepared) -> list:
    """Each complete outcome with its clean and robust accuracy (and their N), read from the stored table."""
    for o, plan in zip(outcomes, prepared.plans, strict=True):
        if o.complete:
            t = prepared.store.read_table(plan.table_path)
            clean = t.column("clean_correct").to_numpy(zero_copy_only=False)
            robust = t.column("robust").drop_null().to_numpy(zero_copy_only=False)
            o.accuracy = {
                "acc": float(clean.mean()), "n": len(clean),
                "rob_acc": float(robust.mean()) if len(robust) else None, "n_robust": len(robust),
            }  # fmt: skip
    return outcomes


def run_compare(cfg: CompareConfig, *, old: LoadedModel | None = None, new: LoadedModel | None = None):
    """Evaluate old and new where not cached, then compare them.

    Returns (outcomes, comparison or None when an evaluation is incomplete, prepared).
    """
    from rcat_ray.distributed.evaluate import evaluate_plans

    prepared = prepare(cfg, [old or cfg.old, new or cfg.new])
    outcomes = _with_accuracy(evaluate_plans(prepared.plans, prepared.store, cfg), prepared)
    comparison: Comparison | None = None
    if all(o.complete for o in outcomes):
        comparison = compare_stored(
            prepared.store, prepared.plans[0].key, prepared.plans[1].key, cfg.bootstrap,
            class_names=list(prepared.split.class_names),
        )  # fmt: skip
    return outcomes, comparison, prepared


def run_table(cfg: TableConfig) -> list:
    """Evaluate every model of every pair (cached), compare each against its pair's old model, and build
    the paper-style tables; writes table.md, table.tex and table.csv into ``cfg.out``."""
    from pathlib import Path

    from rcat_ray.distributed.evaluate import evaluate_plans
    from rcat_ray.paper_table import TableRow, build_pair_table, to_csv, to_latex, to_markdown

    prepared = [prepare(cfg, [p.old, p.new, *(e.model for e in p.finetuned)]) for p in cfg.pairs]
    # every pair's missing chunks first, so a budget-limited run says what remains of all of them
    outcomes_per_pair = [evaluate_plans(prep.plans, prep.store, cfg) for prep in prepared]
    raise_if_incomplete([o for outcomes in outcomes_per_pair for o in outcomes])
    tables = []
    for pair, prep in zip(cfg.pairs, prepared, strict=True):
        labels = [pair.old.display_name, pair.new.display_name, *(e.display_name for e in pair.finetuned)]
        shown_labels = [
            m.name
            for m in distinct_names(
                [dataclasses.replace(m, name=label) for m, label in zip(prep.models, labels, strict=True)]
            )
        ]
        rows = []
        for i, (shown, plan) in enumerate(zip(shown_labels, prep.plans, strict=True)):
            comp = compare_stored(
                prep.store, prep.plans[0].key, plan.key, cfg.bootstrap, class_names=list(prep.split.class_names)
            )
            rows.append(TableRow(shown, comp.summary, comp.flips, is_old=i == 0, comparison_key=comp.key))
        tables.append(
            build_pair_table(
                pair.name,
                rows,
                reference=pair.reference,
                n_bootstrap=cfg.bootstrap.n_resamples,
                confidence=cfg.bootstrap.confidence,
                seed=cfg.bootstrap.seed,
            )
        )
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("table.md", to_markdown(tables)),
        ("table.tex", to_latex(tables)),
        ("table.csv", to_csv(tables)),
    ):
        write_file_atomic(out / name, text)
    return tables
