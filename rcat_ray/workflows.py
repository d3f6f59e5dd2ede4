"""The two user-facing workflows, evaluate and compare, as plain functions of validated configs.

Order matters and is the point of this module: everything that can be wrong with the input (data,
models, their agreement, the store) is checked before Ray starts or any attack runs, and nothing is
written to the store until then.
"""

from __future__ import annotations

from dataclasses import dataclass

from rcat_ray.comparison import Comparison, compare_stored
from rcat_ray.config import CompareConfig, EvaluateConfig, EvaluationSettings, ModelConfig, TableConfig
from rcat_ray.core.data import Split, load_split
from rcat_ray.core.models import LoadedModel, check_model_source, load_model
from rcat_ray.evaluation import EvaluationPlan, validate_pair_inputs
from rcat_ray.store import ResultStore, write_file_atomic


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
    store = ResultStore(settings.store)
    store.check_writable()
    plans = [EvaluationPlan(m, split, settings.attack, settings.chunk_size) for m in loaded]
    return Prepared(store, split, loaded, plans)


def run_evaluate(cfg: EvaluateConfig, *, extra_models: list[LoadedModel] | None = None):
    """Evaluate every model of the config (and any in-memory ones) once; returns (outcomes, prepared)."""
    from rcat_ray.distributed.cluster import ensure_ray
    from rcat_ray.distributed.evaluate import evaluate_plans

    prepared = prepare(cfg, [*cfg.models, *(extra_models or [])])
    ensure_ray(cfg.compute)
    return evaluate_plans(prepared.plans, prepared.store, cfg), prepared


def run_compare(cfg: CompareConfig, *, old: LoadedModel | None = None, new: LoadedModel | None = None):
    """Evaluate old and new where not cached, then compare them.

    Returns (outcomes, comparison or None when an evaluation is incomplete, prepared).
    """
    from rcat_ray.distributed.cluster import ensure_ray
    from rcat_ray.distributed.evaluate import evaluate_plans

    prepared = prepare(cfg, [old or cfg.old, new or cfg.new])
    ensure_ray(cfg.compute)
    outcomes = evaluate_plans(prepared.plans, prepared.store, cfg)
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

    from rcat_ray.distributed.cluster import ensure_ray
    from rcat_ray.distributed.evaluate import evaluate_plans
    from rcat_ray.paper_table import TableRow, build_pair_table, to_csv, to_latex, to_markdown

    prepared = [prepare(cfg, [p.old, p.new, *(e.model for e in p.finetuned)]) for p in cfg.pairs]
    ensure_ray(cfg.compute)
    tables = []
    for pair, prep in zip(cfg.pairs, prepared, strict=True):
        outcomes = evaluate_plans(prep.plans, prep.store, cfg)
        if not all(o.complete for o in outcomes):
            raise RuntimeError(f"pair {pair.name}: evaluations incomplete (max_new_chunks); run again")
        labels = ["old", "new", *(e.label for e in pair.finetuned)]
        rows = []
        for label, plan in zip(labels, prep.plans, strict=True):
            comp = compare_stored(
                prep.store, prep.plans[0].key, plan.key, cfg.bootstrap, class_names=list(prep.split.class_names)
            )
            shown = {"old": pair.old.display_name, "new": pair.new.display_name}.get(label, label)
            rows.append(TableRow(shown, comp.summary, comp.flips, is_old=label == "old", comparison_key=comp.key))
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
