"""The two user-facing workflows, evaluate and compare, as plain functions of validated configs.

Order matters and is the point of this module: everything that can be wrong with the input (data,
models, their agreement, the store) is checked before Ray starts or any attack runs, and nothing is
written to the store until then.
"""

from __future__ import annotations

from dataclasses import dataclass

from rcat_ray.comparison import Comparison, compare_stored
from rcat_ray.config import CompareConfig, EvaluateConfig, EvaluationSettings, ModelConfig
from rcat_ray.core.data import Split, load_split
from rcat_ray.core.models import LoadedModel, check_model_source, load_model
from rcat_ray.evaluation import EvaluationPlan, validate_pair_inputs
from rcat_ray.store import ResultStore


@dataclass
class Prepared:
    """Validated inputs of a run: the store, the samples, the models and their plans."""

    store: ResultStore
    split: Split
    models: list[LoadedModel]
    plans: list[EvaluationPlan]


def prepare(settings: EvaluationSettings, models: list[ModelConfig | LoadedModel]) -> Prepared:
    """Load and cross-check everything a run needs; raises a clear error before any compute.

    ``models`` may mix configs and models already in memory (the Python API, the demo).
    """
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
