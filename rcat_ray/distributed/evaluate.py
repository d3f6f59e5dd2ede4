"""Ray Data evaluation: the missing chunks of each model, attacked by a pool of actors.

The dataset handed to Ray Data holds only chunk descriptors (id, start, stop); it is built with
``from_items`` so there is no read task for the actors to starve on a small node (RAY_NOTES gotcha 6).
The model and the images travel once through the object store; each actor fetches them in its
constructor, pins its torch thread count (so results do not depend on the host), attacks whole chunks
and writes each finished chunk straight into the result store. The driver then assembles the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from rcat_ray.config import ComputeConfig, EvaluationSettings
from rcat_ray.core.models import register_autoattack_alias
from rcat_ray.evaluation import EvaluationPlan, assemble, resolve_device, run_chunk
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
    """Ray Data actor: holds one model and the split, attacks whole chunks, writes them to the store."""

    def __init__(self, payload: list, store_uri: str, device: str, threads: int, keep_adversarial: bool):
        torch.set_num_threads(threads)
        register_autoattack_alias()  # a RobustBench model unpickles only with it
        (self.plan,) = ray.get(payload)  # wrapped in a list so Ray does not resolve it before the actor exists
        self.store = ResultStore(store_uri)
        self.device = resolve_device(device)
        self.keep_adversarial = keep_adversarial
        self.by_id = {c.chunk_id: c for c in self.plan.chunks()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["chunk_id"].tolist()
        rows = [
            run_chunk(self.plan, self.by_id[i], self.store, device=self.device, keep_adversarial=self.keep_adversarial)
            for i in ids
        ]
        return {"chunk_id": np.asarray(ids, dtype=np.int64), "n_rows": np.asarray(rows, dtype=np.int64)}


def _actor_resources(compute: ComputeConfig) -> dict[str, Any]:
    return {"num_cpus": compute.cpus_per_worker, "num_gpus": compute.gpus_per_worker}


def evaluate_plans(
    plans: list[EvaluationPlan], store: ResultStore, settings: EvaluationSettings
) -> list[EvaluationOutcome]:
    """Evaluate each plan's missing chunks on Ray, then assemble complete tables.

    ``settings.max_new_chunks`` bounds the new work of this call (over all plans), for time-boxed runs;
    the rest is picked up by the next call.
    """
    compute = settings.compute
    budget = settings.max_new_chunks
    outcomes = []
    for plan in plans:
        n_chunks = len(plan.chunks())
        if store.exists(plan.table_path):
            outcomes.append(EvaluationOutcome(plan.model.name, plan.key, n_chunks, n_chunks, 0, True, plan.table_path))
            continue
        missing = plan.missing_chunks(store)
        if budget is not None:
            missing = missing[: max(0, budget)]
            budget -= len(missing)
        cached = n_chunks - len(plan.missing_chunks(store))
        computed = _run_chunks_on_ray(plan, missing, store, compute, settings.save_adversarial) if missing else 0
        complete = not plan.missing_chunks(store)
        if complete:
            assemble(plan, store, settings)
        outcomes.append(
            EvaluationOutcome(
                plan.model.name, plan.key, n_chunks, cached, computed, complete, plan.table_path if complete else None
            )
        )
    return outcomes


def _run_chunks_on_ray(
    plan: EvaluationPlan, chunks: list, store: ResultStore, compute: ComputeConfig, keep_adversarial: bool
) -> int:
    payload = [ray.put(plan)]
    pool = min(compute.num_workers, len(chunks))
    ds = ray.data.from_items([{"chunk_id": c.chunk_id} for c in chunks], override_num_blocks=len(chunks))
    results = ds.map_batches(
        ChunkEvaluator,
        fn_constructor_kwargs={
            "payload": payload,
            "store_uri": store.uri if "://" in store.uri else store.root,
            "device": compute.device,
            "threads": compute.threads,
            "keep_adversarial": keep_adversarial,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=pool),
        **_actor_resources(compute),
    ).take_all()
    done = sorted(int(r["chunk_id"]) for r in results)
    log.info("%s: computed %d chunks", plan.model.name, len(done))
    return len(done)
