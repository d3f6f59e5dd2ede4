"""The two user-facing workflows, evaluate and compare, as plain functions of validated configs.

Order matters and is the point of this module: everything that can be wrong with the input (data,
models, their agreement, the store) is checked before Ray starts or any attack runs, and nothing is
written to the store until then.

The driver never holds the evaluated images: the selection is prepared once as a sample set in the result
store (decoded, uint8, chunk-aligned; reused by every later run) and the models are checked on two of its
rows. Plans carry the set and model references (source and fingerprint), which is all the workers receive.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rcat_ray.config import DataConfig, EvaluationSettings, ModelConfig
from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.core.data import Split, load_split
from rcat_ray.core.flips.confirmed import confirmed_rates, flip_ids
from rcat_ray.core.models import (
    LoadedModel,
    ModelRef,
    check_model_source,
    load_model,
    model_reference,
    validate_pair_inputs,
)
from rcat_ray.core.progress import log as progress_log
from rcat_ray.core.samples import SampleSet, open_samples, samples_in_store, samples_location
from rcat_ray.errors import DataError, IncompleteRunError
from rcat_ray.evaluate.comparison import Comparison, compare_stored
from rcat_ray.evaluate.config import CompareConfig, EvaluateConfig, TableConfig
from rcat_ray.evaluate.confirm import SIDES, ConfirmPlan, holds, store_side, stored_side, stronger_attack
from rcat_ray.evaluate.ensemble import EnsemblePlan, assemble_ensemble
from rcat_ray.evaluate.plan import EvaluationPlan
from rcat_ray.store.result_store import ResultStore

#: Stored bytes a row group of an evaluation's sample set aims at (at most): a chunk reads whole row groups.
ROW_GROUP_BYTES = 256 * 2**20


def raise_if_incomplete(outcomes: list) -> None:
    """Say what remains of an incomplete evaluation, as an error the CLI turns into exit status 3."""
    left = [o for o in outcomes if not o.complete]
    if left:
        remaining = ", ".join(
            f"{o.model_name}: {o.n_chunks - o.chunks_cached - o.chunks_computed} of {o.n_chunks} chunks" for o in left
        )
        raise IncompleteRunError(f"incomplete: {remaining} remain; run the same command again to continue")


def distinct_names(models: list[Any]) -> list[Any]:
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


@dataclass(frozen=True)
class SelectionSummary:
    """What callers read of the evaluated selection besides the plans: its size, class names and description
    (equal to ``Split.describe()``), without a pixel in memory."""

    n: int
    class_names: tuple[str, ...]
    description: dict[str, Any]

    def __len__(self) -> int:
        return self.n

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


@dataclass
class Prepared:
    """Validated inputs of a run: the store, the prepared samples, the model references and their plans."""

    store: ResultStore
    samples: SampleSet
    models: list[ModelRef]
    plans: list[EvaluationPlan]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.samples.info.class_names)

    @property
    def split(self) -> SelectionSummary:
        """The selection's summary (callers written when the driver held the whole split read these fields)."""
        return SelectionSummary(len(self.samples), self.class_names, self.samples.describe())


def store_location(store: ResultStore) -> str:
    """The store as every process names it: its URI, or the absolute path of a local store."""
    return store.uri if "://" in store.uri else store.root


def rows_per_group(chunk_size: int, row_bytes: int) -> int:
    """Row-group size for an evaluation's sample set: the chunk size when a group of it stays under
    ``ROW_GROUP_BYTES``, else its largest divisor that does, so every chunk reads exactly its own rows."""
    fitting = [d for d in range(1, chunk_size + 1) if chunk_size % d == 0 and d * row_bytes <= ROW_GROUP_BYTES]
    return max(fitting, default=1)


def _existing_samples(location: str) -> SampleSet | None:
    """The selection's set when an earlier run (or ``rcat-ray data prepare``) stored it, else None."""
    try:
        return open_samples(location)
    except (DataError, OSError):
        return None  # absent, unreadable or unusable: the store check, or preparing it, says which


def _probe(data: DataConfig) -> Split:
    """Two samples of a selection whose set does not exist yet, read from the source without writing anything
    (so a model that fails the checks leaves the store untouched); ImageNet decodes only these two images."""
    return load_split(data.model_copy(update={"limit": min(2, data.limit or 2)}))


def prepare(settings: EvaluationSettings, models: list[ModelConfig | LoadedModel]) -> Prepared:
    """Load and cross-check everything a run needs; raises a clear error before any compute.

    ``models`` may mix configs and models already in memory (the Python API, the demo). A RobustBench
    source without a threat model takes the attack's norm (Linf or L2 zoo). The models are loaded here once,
    to fingerprint them and to check them on two rows of the data; the plans then keep only references
    (their source and fingerprint), so the driver holds neither the images nor, for models it can reload,
    the weights. The selection's sample set is prepared in the store (first use) only after the models pass,
    with row groups of the chunk size (or a divisor of it); a set that exists is reused as it is.
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
    store = ResultStore(settings.store)
    location = samples_location(store_location(store), settings.data)
    samples = _existing_samples(location)
    probe = samples.to_split(0, min(2, len(samples))) if samples is not None else _probe(settings.data)
    loaded = [
        m
        if isinstance(m, LoadedModel)
        else load_model(m, num_classes=probe.num_classes, input_shape=probe.input_shape, data_name=settings.data.name)
        for m in models
    ]
    validate_pair_inputs(loaded, probe)
    loaded = distinct_names(loaded)
    store.check_writable()
    if samples is None:
        row_bytes = 4 * int(probe.images[0].numel())  # float32 at most (uint8 when exact)
        samples = samples_in_store(
            store_location(store), settings.data, rows_per_group=rows_per_group(settings.chunk_size, row_bytes)
        )
    refs = [
        model_reference(
            m,
            cfg if isinstance(cfg, ModelConfig) else None,
            input_shape=probe.input_shape,
            data_name=settings.data.name,
        )
        for m, cfg in zip(loaded, models, strict=True)
    ]
    del loaded  # the driver keeps no weights it can reload
    plans = [_plan(r, samples, settings) for r in refs]
    return Prepared(store, samples, refs, plans)


def _plan(ref: ModelRef, samples: SampleSet, settings: EvaluationSettings) -> EvaluationPlan | EnsemblePlan:
    """One model's plan: its table, or with ``attack.seeds`` one table per seed and their ensemble."""
    attack = settings.attack
    if attack.seeds is None:
        return EvaluationPlan(ref, samples, attack, settings.chunk_size)
    seed_plans = [EvaluationPlan(ref, samples, attack.single_seed(s), settings.chunk_size) for s in attack.seeds]
    return EnsemblePlan(seed_plans, attack)


def evaluate_prepared(prepared: Prepared, settings: EvaluationSettings) -> list:
    """Evaluate what is missing of every plan (every seed's chunks in one Ray pipeline), then assemble the
    ensembles whose seeds are complete; one outcome per model."""
    from rcat_ray.evaluate.ray_evaluate import EvaluationOutcome, evaluate_plans

    flat = [q for p in prepared.plans for q in (p.seed_plans if isinstance(p, EnsemblePlan) else [p])]
    done = iter(evaluate_plans(flat, prepared.store, settings))
    outcomes = []
    for plan in prepared.plans:
        if not isinstance(plan, EnsemblePlan):
            outcomes.append(next(done))
            continue
        parts = [next(done) for _ in plan.seed_plans]
        complete = all(o.complete for o in parts)
        if complete:
            assemble_ensemble(plan, prepared.store, settings)
        outcomes.append(
            EvaluationOutcome(
                plan.model.name,
                plan.key,
                sum(o.n_chunks for o in parts),
                sum(o.chunks_cached for o in parts),
                sum(o.chunks_computed for o in parts),
                complete,
                plan.table_path if complete else None,
            )
        )
    return outcomes


def run_evaluate(cfg: EvaluateConfig, *, extra_models: list[LoadedModel] | None = None):
    """Evaluate every model of the config (and any in-memory ones) once; returns (outcomes, prepared).

    Ray is started only when some chunk must be computed: what is stored is reused without it.
    """
    prepared = prepare(cfg, [*cfg.models, *(extra_models or [])])
    outcomes = evaluate_prepared(prepared, cfg)
    return _with_accuracy(outcomes, prepared), prepared


def _with_accuracy(outcomes: list, prepared: Prepared) -> list:
    """Each complete outcome with its clean and robust accuracy (and their N), read from the stored table."""
    for o, plan in zip(outcomes, prepared.plans, strict=True):
        if o.complete:
            t = prepared.store.read_table(plan.table_path)
            clean = t.column("clean_correct").to_numpy(zero_copy_only=False)
            robust = t.column("robust").drop_null().to_numpy(zero_copy_only=False)
            o.accuracy = {
                "acc": float(clean.mean()),
                "n": len(clean),
                "rob_acc": float(robust.mean()) if len(robust) else None,
                "n_robust": len(robust),
            }
            manifest = prepared.store.read_json(plan.manifest_path) or {}
            o.sanity = manifest.get("sanity")
            o.attack_noise = (manifest.get("ensemble") or {}).get("attack_noise")
    return outcomes


def run_compare(cfg: CompareConfig, *, old: LoadedModel | None = None, new: LoadedModel | None = None):
    """Evaluate old and new where not cached, then compare them.

    Returns (outcomes, comparison or None when an evaluation is incomplete, prepared).
    """
    prepared = prepare(cfg, [old or cfg.old, new or cfg.new])
    outcomes = _with_accuracy(evaluate_prepared(prepared, cfg), prepared)
    comparison: Comparison | None = None
    if all(o.complete for o in outcomes):
        comparison = compare_stored(
            prepared.store,
            prepared.plans[0].key,
            prepared.plans[1].key,
            cfg.bootstrap,
            class_names=list(prepared.class_names),
            near_margin=cfg.near_margin,
        )
        if cfg.confirm:
            comparison.confirmed = confirm_comparison(prepared, comparison, cfg)
    return outcomes, comparison, prepared


def confirm_comparison(
    prepared: Prepared, comparison: Comparison, cfg: CompareConfig | TableConfig, old: int = 0, new: int = 1
) -> dict:
    """Re-attack the comparison's robustness flips with the stronger attack (each side once: stored beside the
    comparison, reused by any later run) and return the confirmed R-NFR and R-PFR (:mod:`.confirm`); ``old`` and
    ``new`` index the two models in ``prepared``."""
    attack = stronger_attack(cfg.attack, cfg.confirm_attack)
    plan = ConfirmPlan(comparison.key, attack)
    ids = flip_ids(comparison.flips)
    tables = {side: stored_side(prepared.store, plan, side) for side in SIDES}
    models = {"old": prepared.plans[old].model, "new": prepared.plans[new].model}
    todo = {side: (models[side], ids[side]) for side in SIDES if tables[side] is None}
    if todo:
        from rcat_ray.evaluate.ray_confirm import attack_sides

        n = sum(len(v[1]) for v in todo.values())
        progress_log.info(f"[confirm] re-attacking {n} flipped samples with {' + '.join(attack.cascade)}")
        for side, table in attack_sides(todo, prepared.samples.uri, attack, cfg.chunk_size, cfg.compute).items():
            store_side(prepared.store, plan, side, table, ids[side])
            tables[side] = table
    b = cfg.bootstrap
    rates = confirmed_rates(
        comparison.flips,
        {side: holds(t) for side, t in tables.items()},
        n_bootstrap=b.n_resamples,
        confidence=b.confidence,
        seed=b.seed,
    )
    record = {"key": plan.key, "attack": attack.model_dump(mode="json"), **rates}
    prepared.store.put_json(f"{plan.folder}/confirmed.json", record)  # written once: the report reads it
    return {**record, "re_attacked": {side: len(ids[side]) for side in todo}}


def _confirmed_metrics(confirmed: dict) -> dict:
    return {k: confirmed[k] for k in ("r_nfr_confirmed", "r_pfr_confirmed")}


def run_table(cfg: TableConfig) -> list:
    """Evaluate every model of every pair (cached), compare each against its pair's old model, and build
    the paper-style tables; writes table.md, table.tex and table.csv into ``cfg.out``."""
    from pathlib import Path

    from rcat_ray.evaluate.paper_table import TableRow, build_pair_table, to_csv, to_latex, to_markdown

    prepared = [prepare(cfg, [p.old, p.new, *(e.model for e in p.finetuned)]) for p in cfg.pairs]
    # every pair's missing chunks first, so a budget-limited run says what remains of all of them
    outcomes_per_pair = [evaluate_prepared(prep, cfg) for prep in prepared]
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
                prep.store,
                prep.plans[0].key,
                plan.key,
                cfg.bootstrap,
                class_names=list(prep.class_names),
                near_margin=cfg.near_margin,
            )
            summary = comp.summary
            if cfg.confirm and i > 0:  # the row's robustness flips against old, re-checked by the stronger attack
                confirmed = confirm_comparison(prep, comp, cfg, old=0, new=i)
                summary = {**summary, "metrics": {**summary["metrics"], **_confirmed_metrics(confirmed)}}
            rows.append(TableRow(shown, summary, comp.flips, is_old=i == 0, comparison_key=comp.key))
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
