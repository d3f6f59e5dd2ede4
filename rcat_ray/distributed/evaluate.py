"""Ray Data evaluation: the missing chunks of each model, attacked by a pool of actors.

The dataset handed to Ray Data holds only chunk descriptors (id, start, stop); it is built with
``from_items`` so there is no read task for the actors to starve on a small node (RAY_NOTES gotcha 6).
The model and the images travel once through the object store; each actor fetches them in its
constructor, pins its torch thread count (so results do not depend on the host), attacks whole chunks
and writes each finished chunk straight into the result store. The driver then assembles the table.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import numpy as np
import ray
import torch

from rcat_ray.config import ComputeConfig, EvaluationSettings
from rcat_ray.core.models import register_autoattack_alias
from rcat_ray.evaluation import EvaluationPlan, EvaluationRunError, assemble, resolve_device, run_chunk
from rcat_ray.store import ResultStore

log = logging.getLogger(__name__)


@dataclass
class EvaluationOutcome:
    """What one model's evaluation did: how much was reused and where the table is."""

    model_name: str
    key: str
    n_chunks: int
    chunks_cached: int
    chunks_computed: int
    complete: bool
    table_path: str | None

    def describe(self) -> str:
        state = "done" if self.complete else "incomplete"
        return (
            f"{self.model_name}: {state}, {self.chunks_computed} chunks computed, "
            f"{self.chunks_cached} reused of {self.n_chunks} (table {self.key})"
        )


class ChunkEvaluator:
    """Ray Data actor: holds the plans (models and the split), attacks whole chunks, writes them to the store."""

    def __init__(self, payload: list, store_uri: str, device: str, threads: int, keep_adversarial: bool):
        torch.set_num_threads(threads)
        register_autoattack_alias()  # a RobustBench model unpickles only with it
        (self.plans,) = ray.get(payload)  # wrapped in a list so Ray does not resolve it before the actor exists
        self.store = ResultStore(store_uri)
        self.device = resolve_device(device)
        self.keep_adversarial = keep_adversarial
        self.chunks = [{c.chunk_id: c for c in plan.chunks()} for plan in self.plans]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = list(zip(batch["plan"].tolist(), batch["chunk_id"].tolist(), strict=True))
        rows = [
            run_chunk(self.plans[p], self.chunks[p][c], self.store, device=self.device,
                      keep_adversarial=self.keep_adversarial)
            for p, c in pairs
        ]  # fmt: skip
        return {
            "plan": batch["plan"].astype(np.int64),
            "chunk_id": batch["chunk_id"].astype(np.int64),
            "n_rows": np.asarray(rows, dtype=np.int64),
        }


def evaluate_plans(
    plans: list[EvaluationPlan], store: ResultStore, settings: EvaluationSettings
) -> list[EvaluationOutcome]:
    """Evaluate the missing chunks of every plan in one Ray Data pipeline, then assemble complete tables.

    One pipeline for all models means one actor pool start-up per call, not one per model.
    ``settings.max_new_chunks`` bounds the new work of this call (over all plans), for time-boxed runs;
    the rest is picked up by the next call.

    Nothing is reused because it exists: a stored table is reused only when it matches the sha256 in its
    manifest, a chunk only when its own manifest exists and matches (see ``rcat_ray.evaluation``). A damaged
    table is moved aside and reassembled from its chunks, a damaged chunk is moved aside and attacked again;
    each is logged as a warning naming the file. Chunks missing under a good table (moved aside by
    ``verify_store(repair=True)``) are recomputed too, found by one folder listing, so a finished table costs
    one hash of its own file.
    """
    budget = settings.max_new_chunks
    todo: list[tuple[int, int]] = []
    cached: list[int] = []
    table_good: list[bool] = []
    for i, plan in enumerate(plans):
        table_good.append(plan.table_done(store))  # a damaged table is moved aside here
        missing = plan.missing_chunks(store, verify=not table_good[i])
        cached.append(len(plan.chunks()) - len(missing))
        if budget is not None:
            missing = missing[: max(0, budget - len(todo))]
        todo += [(i, c.chunk_id) for c in missing]
    done = _run_chunks_on_ray(plans, todo, store, settings.compute, settings.save_adversarial) if todo else []
    outcomes = []
    for i, plan in enumerate(plans):
        complete = table_good[i] or not plan.missing_chunks(store)
        if complete:
            assemble(plan, store, settings)
        outcomes.append(EvaluationOutcome(
            plan.model.name, plan.key, len(plan.chunks()), cached[i], sum(1 for p, _ in done if p == i),
            complete, plan.table_path if complete else None,
        ))  # fmt: skip
    return outcomes


def _run_chunks_on_ray(
    plans: list[EvaluationPlan],
    todo: list[tuple[int, int]],
    store: ResultStore,
    compute: ComputeConfig,
    keep_adversarial: bool,
) -> list[tuple[int, int]]:
    payload = [ray.put(plans)]
    ds = ray.data.from_items([{"plan": p, "chunk_id": c} for p, c in todo], override_num_blocks=len(todo))
    pipeline = ds.map_batches(
        ChunkEvaluator,
        fn_constructor_kwargs={
            "payload": payload,
            "store_uri": store.uri if "://" in store.uri else store.root,
            "device": compute.device,
            "threads": compute.threads,
            "keep_adversarial": keep_adversarial,
        },
        batch_size=1,
        # one chunk in flight per actor: chunks are long (seconds to minutes), so queueing a second one behind a
        # busy actor only leaves another actor idle at the end of the run
        compute=ray.data.ActorPoolStrategy(size=min(compute.num_workers, len(todo)), max_tasks_in_flight_per_actor=1),
        num_cpus=compute.cpus_per_worker,
        num_gpus=compute.gpus_per_worker,
    )
    failure = None
    try:
        results = pipeline.take_all()
    except Exception as err:  # noqa: BLE001 - re-raised below, once the pipeline can be released
        failure = f"{type(err).__name__}: {err}"
    if failure is not None:
        # The original exception's traceback holds the pipeline, whose actors keep their CPUs/GPUs for as long
        # as it lives (a caller that keeps the error would starve later Ray work); raise a plain one instead.
        del pipeline, ds, payload
        gc.collect()
        raise EvaluationRunError(
            f"the evaluation stopped: {failure}\nfinished chunks are stored; run again to compute the rest"
        )
    log.info("computed %d chunks", len(results))
    return [(int(r["plan"]), int(r["chunk_id"])) for r in results]
