"""Ray Data evaluation: the missing chunks of each model, attacked by a pool of actors.

The dataset handed to Ray Data holds only chunk descriptors (id, start, stop); it is built with
``from_items`` so there is no read task for the actors to starve on a small node (RAY_NOTES gotcha 6).
The model and the images travel once through the object store; each actor fetches them in its
constructor, pins its torch thread count (so results do not depend on the host), attacks whole chunks
and writes each finished chunk straight into the result store. The driver then assembles the table.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass

import numpy as np
import ray
import torch

from rcat_ray.config import ComputeConfig, EvaluationSettings
from rcat_ray.core.models import register_autoattack_alias
from rcat_ray.distributed.cluster import ensure_ray
from rcat_ray.evaluation import (
    EvaluationPlan,
    EvaluationRunError,
    assemble,
    chunk_file_names,
    resolve_device,
    run_chunk,
)
from rcat_ray.interrupts import EvaluationInterrupted, interrupt_signal_name
from rcat_ray.progress import Progress
from rcat_ray.progress import log as progress_log
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
    accuracy: dict | None = None  # clean and robust accuracy with their N, once the table is complete

    def describe(self) -> str:
        state = "done" if self.complete else "incomplete"
        acc = ""
        if self.accuracy:
            a = self.accuracy
            rob = "n/a" if a["rob_acc"] is None else f"{100 * a['rob_acc']:.2f}%"
            acc = f"; clean acc {100 * a['acc']:.2f}% (N={a['n']}), robust acc {rob} (N={a['n_robust']})"
        return (
            f"{self.model_name}: {state}, {self.chunks_computed} chunks computed, "
            f"{self.chunks_cached} reused of {self.n_chunks} (table {self.key}){acc}"
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
        rows = [self._run(p, c) for p, c in pairs]
        return {
            "plan": batch["plan"].astype(np.int64),
            "chunk_id": batch["chunk_id"].astype(np.int64),
            "n_rows": np.asarray(rows, dtype=np.int64),
        }

    def _run(self, p: int, c: int) -> int:
        """One chunk; if it is cut short (an error, or the SystemExit Ray raises in a worker on SIGTERM when
        an interrupted run or a drained node stops it), the temporary files it had begun are removed, so an
        interrupt leaves only finished chunks and no litter. Files of a finished chunk have their final
        names; a member written without its manifest is handled by the store on the next run."""
        plan = self.plans[p]
        before = self._temporary_files(plan, c)
        try:
            return run_chunk(plan, self.chunks[p][c], self.store, device=self.device,
                             keep_adversarial=self.keep_adversarial)  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):
                for name in self._temporary_files(plan, c) - before:  # ours: names are unique per write
                    self.store.fs.delete_file(self.store.path(f"{plan.chunks_folder}/{name}"))
            raise

    def _temporary_files(self, plan: EvaluationPlan, chunk_id: int) -> set[str]:
        """The store's temporary files (``.tmp-<uuid>-<final name>``) for this chunk's files."""
        suffixes = tuple(f"-{name}" for name in chunk_file_names(chunk_id))
        try:
            names = self.store.list_files(plan.chunks_folder)
        except Exception:  # noqa: BLE001 - housekeeping never fails a chunk
            return set()
        return {n for n in names if n.startswith(".tmp-") and n.endswith(suffixes)}


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
    """Attack the ``todo`` chunks on a Ray Data actor pool; returns the (plan, chunk id) pairs it finished.

    Finished chunks are streamed back as they come (not collected at the end), so the driver can log a
    progress line per chunk (at most one every ~10 s when chunks are fast) with done/total and an ETA,
    whether stderr is a terminal, a pipe or a log file. Ctrl+C, or SIGTERM under
    :func:`rcat_ray.interrupts.sigterm_as_interrupt`, releases the actor pool as a failure does and raises
    :class:`EvaluationInterrupted` saying how many chunks are stored. The driver writes nothing here: each
    actor stores its chunk atomically (its manifest last) and tables are assembled by the caller only after
    a full return, so an interrupted run never leaves a table built from part of its chunks.
    """

    def stored_chunks(default: int) -> int:
        """Chunks of these plans stored now: one folder listing per plan (``default`` if the store cannot be
        listed: a count for a message must never fail the run or hide the interrupt)."""
        try:
            return sum(len(plan.chunks()) - len(plan.missing_chunks(store, verify=False)) for plan in plans)
        except Exception:  # noqa: BLE001
            return default

    ensure_ray(compute)  # started only now that some chunk must be computed (a no-op when Ray is up)
    total = sum(len(plan.chunks()) for plan in plans)
    stored_before = stored_chunks(default=total - len(todo))
    workers = min(compute.num_workers, len(todo))
    progress = Progress("evaluate", total, "chunks", done=stored_before)
    names = sorted({plans[p].model.name for p, _ in todo})
    actors = f"{workers} actor{'s' if workers != 1 else ''}"
    progress_log.info(progress.line(f"{len(todo)} to compute on {actors}; {', '.join(names)}"))
    finished: list[tuple[int, int]] = []
    failure = interrupted = None
    payload = ds = pipeline = batches = None
    try:
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
            # one chunk in flight per actor: chunks are long (seconds to minutes), so queueing a second one
            # behind a busy actor only leaves another actor idle at the end of the run
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=compute.cpus_per_worker,
            num_gpus=compute.gpus_per_worker,
        )
        # batch_size=None: each block as soon as its actor returns it (one chunk per block), never held back
        # to fill a batch
        batches = pipeline.iter_batches(batch_size=None, batch_format="numpy")
        for batch in batches:
            for p, c in zip(batch["plan"].tolist(), batch["chunk_id"].tolist(), strict=True):
                finished.append((int(p), int(c)))
                progress.update(1, extra=f"{plans[p].model.name} chunk {c}")
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM as Terminated: release the pool, then say what is kept
        interrupted = interrupt_signal_name(err)
    except Exception as err:  # noqa: BLE001 - re-raised below, once the pipeline can be released
        failure = f"{type(err).__name__}: {err}"
    if failure is not None or interrupted is not None:
        # The exception's traceback holds the pipeline, whose actors keep their CPUs/GPUs for as long as it
        # lives (a caller that keeps the error would starve later Ray work): drop every reference to it,
        # including the half-consumed iterator, and raise a plain exception instead.
        try:
            if batches is not None and hasattr(batches, "close"):
                batches.close()
            del batches, pipeline, ds, payload
            gc.collect()
        except KeyboardInterrupt:  # a second Ctrl+C while releasing: the references go when this frame does
            pass
    if interrupted is not None:  # no progress line: the one-line interrupt message says what is stored
        stored = stored_chunks(default=stored_before + len(finished))
        raise EvaluationInterrupted(stored, total, interrupted) from None
    if failure is not None:
        raise EvaluationRunError(
            f"the evaluation stopped: {failure}\nfinished chunks are stored; run again to compute the rest"
        )
    progress.close()
    log.info("computed %d chunks", len(finished))
    return finished
