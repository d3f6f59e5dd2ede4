"""Ray Data adapter of the evaluation: the missing chunks of each model, attacked by a pool of actors.

The dataset holds only chunk descriptors (plan, chunk id, start, stop), built with ``from_items`` so no read
task can starve the actors on a small node; each actor gets the plans (:class:`rcat_ray.evaluate.plan.PlanSpec`:
a few hundred bytes each), reads its chunk's rows from the sample set, loads each model from its source once
(an LRU of two), and writes each finished chunk straight into the result store with a manifest naming its Ray
node; the driver then assembles the tables. Results do not depend on placement or on the chunks in flight: a
chunk's rows and seed are fixed by the plan. See docs/architecture.md (the data path).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from dataclasses import dataclass

import numpy as np
import ray
import torch

from rcat_ray.config import ComputeConfig, EvaluationSettings
from rcat_ray.core.atomic import final_name
from rcat_ray.core.attack_checks import describe_flags
from rcat_ray.core.models import register_autoattack_alias
from rcat_ray.core.progress import Progress
from rcat_ray.core.progress import log as progress_log
from rcat_ray.core.samples import SampleSet, open_samples
from rcat_ray.errors import EvaluationRunError
from rcat_ray.evaluate.plan import (
    Chunk,
    EvaluationPlan,
    ModelCache,
    PlanSpec,
    assemble,
    chunk_file_names,
    resolve_device,
    run_chunk,
)
from rcat_ray.runtime import cluster, hooks
from rcat_ray.runtime.allocator import retain_freed_heap
from rcat_ray.runtime.failures import describe_failure
from rcat_ray.runtime.interrupts import EvaluationInterrupted, interrupt_signal_name
from rcat_ray.store.result_store import ResultStore

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
    sanity: dict | None = None  # AutoAttack's sanity record from the table's manifest (core.attack_checks)
    attack_noise: dict | None = None  # with several attack seeds: how often they disagree (evaluate.ensemble)

    def describe(self) -> str:
        state = "done" if self.complete else "incomplete"
        acc = ""
        if self.accuracy:
            a = self.accuracy
            rob = "n/a" if a["rob_acc"] is None else f"{100 * a['rob_acc']:.2f}%"
            acc = f"; clean acc {100 * a['acc']:.2f}% (N={a['n']}), robust acc {rob} (N={a['n_robust']})"
        checks = f"; {describe_flags(self.sanity)}" if self.complete else ""
        if self.complete and self.attack_noise and self.attack_noise.get("rate") is not None:
            a = self.attack_noise
            checks += (
                f"; attack noise {100 * a['rate']:.2f}% ({a['disagree']} of {a['n']} attacked samples change their "
                f"robust flag between seeds)"
            )
        return (
            f"{self.model_name}: {state}, {self.chunks_computed} chunks computed, "
            f"{self.chunks_cached} reused of {self.n_chunks} (table {self.key}){acc}{checks}"
        )


#: Models an evaluation actor keeps loaded: the one it attacks and the next, while chunks of both are in flight.
MODELS_PER_ACTOR = 2


class ChunkEvaluator:
    """Ray Data actor: reads its chunks' rows from the sample sets, loads the models from their sources (an LRU
    of ``MODELS_PER_ACTOR``), attacks one chunk at a time and writes each to the store."""

    def __init__(
        self,
        specs: list[PlanSpec],
        modules: dict[str, list],
        store_uri: str,
        device: str,
        threads: int,
        keep_adversarial: bool,
    ):
        self.threads = threads
        torch.set_num_threads(threads)
        retain_freed_heap()  # no page faults for every attack step's buffers (see rcat_ray.runtime.allocator)
        register_autoattack_alias()  # a RobustBench model unpickles only with it
        self.specs = specs
        self.modules = modules  # fingerprint -> [object ref] of in-memory models, fetched on first use
        self.store = ResultStore(store_uri)
        self.device = resolve_device(device)
        self.keep_adversarial = keep_adversarial
        self.node = ray.get_runtime_context().get_node_id()  # differs between Ray nodes on one machine
        self.models = ModelCache(MODELS_PER_ACTOR)
        self._sets: dict[str, SampleSet] = {}
        self._plans: dict[int, EvaluationPlan] = {}
        self._open_lock = threading.Lock()  # opening sets and plans (concurrent calls share the caches)
        self._attack_lock = threading.Lock()  # one attack at a time, whatever the number of chunks in flight

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(self.threads)  # per calling thread: Ray Data may call from a thread pool
        descriptors = zip(
            batch["plan"].tolist(),
            batch["chunk_id"].tolist(),
            batch["start"].tolist(),
            batch["stop"].tolist(),
            strict=True,
        )
        rows = [self._run(p, Chunk(c, start, stop)) for p, c, start, stop in descriptors]
        return {
            "plan": batch["plan"].astype(np.int64),
            "chunk_id": batch["chunk_id"].astype(np.int64),
            "n_rows": np.asarray(rows, dtype=np.int64),
        }

    def _plan(self, p: int) -> EvaluationPlan:
        """Plan ``p`` over its sample set, opened once per location (the set's description and file listing)."""
        with self._open_lock:
            if p not in self._plans:
                spec = self.specs[p]
                if spec.samples not in self._sets:
                    self._sets[spec.samples] = open_samples(spec.samples)
                self._plans[p] = spec.open(self._sets[spec.samples])
            return self._plans[p]

    def _fetch_module(self, fingerprint: str) -> torch.nn.Module:
        """An in-memory model's module, from the object store (sent once by the driver)."""
        (ref,) = self.modules[fingerprint]
        return ray.get(ref)

    def _run(self, p: int, chunk: Chunk) -> int:
        """One chunk; if it is cut short (an error, or the SystemExit Ray raises in a worker on SIGTERM when
        an interrupted run or a drained node stops it), the temporary files it had begun are removed, so an
        interrupt leaves only finished chunks and no litter. Files of a finished chunk have their final
        names; a member written without its manifest is handled by the store on the next run."""
        plan = self._plan(p)
        if chunk not in plan.chunks()[chunk.chunk_id : chunk.chunk_id + 1]:
            raise EvaluationRunError(f"chunk descriptor {chunk} does not match plan {plan.key}'s chunking")
        if plan.chunk_done(self.store, chunk):
            return chunk.stop - chunk.start
        hooks.chunk_gate(p, chunk.chunk_id, self.node)  # a testing aid: a no-op unless its variable is set
        rows = plan.samples.read_rows(chunk.start, chunk.stop)  # outside the lock: overlaps the running attack
        with self._attack_lock:
            before = self._temporary_files(plan, chunk.chunk_id)
            try:
                ref = plan.model
                module = self.models.get(ref, lambda: self._fetch_module(ref.fingerprint))
                return run_chunk(
                    plan,
                    chunk,
                    self.store,
                    device=self.device,
                    keep_adversarial=self.keep_adversarial,
                    module=module,
                    rows=rows,
                    node=self.node,
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    for name in self._temporary_files(plan, chunk.chunk_id) - before:  # ours: names are unique
                        self.store.fs.delete_file(self.store.path(f"{plan.chunks_folder}/{name}"))
                raise

    def _temporary_files(self, plan: EvaluationPlan, chunk_id: int) -> set[str]:
        """The store's temporary files (``.<final name>.tmp-<uuid>``) for this chunk's files."""
        finals = set(chunk_file_names(chunk_id))
        try:
            names = self.store.list_files(plan.chunks_folder)
        except Exception:  # noqa: BLE001 - housekeeping never fails a chunk
            return set()
        return {n for n in names if final_name(n) in finals}


def _kill_stranded_actors() -> int:
    """Kill the evaluation actors this process still holds handles to, after a failed or interrupted run.

    Ray Data releases an aborted pipeline's actors by dropping its references, not with ``ray.kill`` (so that
    lineage can rebuild their outputs). In Ray 2.60 a task-done callback of the aborted run (a ``partial`` with
    ``actor_to_return``) keeps one actor's handle alive in the driver, and that actor, with the CPU or GPU it
    holds, lives until the driver exits: a long-lived caller (a notebook, a sweep driver) would see later Ray
    work wait for ever for that resource. Nothing of the actors is needed after a failure: finished chunks are
    in the store. Returns how many were killed."""
    killed = 0
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which warns or runs code on some module proxies
        if type(obj) is not ray.actor.ActorHandle:
            continue
        descriptor = getattr(obj, "_ray_actor_creation_function_descriptor", None)
        if descriptor is not None and ChunkEvaluator.__name__ in descriptor.class_name:
            with contextlib.suppress(Exception):  # already dead, or Ray going down: nothing left to free
                ray.kill(obj, no_restart=True)
                killed += 1
    if killed:
        log.debug("killed %d evaluation actor(s) left by the aborted pipeline", killed)
    return killed


def evaluate_plans(
    plans: list[EvaluationPlan], store: ResultStore, settings: EvaluationSettings
) -> list[EvaluationOutcome]:
    """Evaluate the missing chunks of every plan in one Ray Data pipeline, then assemble complete tables.

    One pipeline for all models means one actor pool start-up per call, not one per model.
    ``settings.max_new_chunks`` bounds the new work of this call (over all plans), for time-boxed runs;
    the rest is picked up by the next call.

    Nothing is reused because it exists: a stored table is reused only when it matches the sha256 in its
    manifest, a chunk only when its own manifest exists and matches (see ``rcat_ray.evaluate.plan``). A damaged
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
        outcomes.append(
            EvaluationOutcome(
                plan.model.name,
                plan.key,
                len(plan.chunks()),
                cached[i],
                sum(1 for p, _ in done if p == i),
                complete,
                plan.table_path if complete else None,
            )
        )
    return outcomes


def _in_memory_modules(plans: list[EvaluationPlan], todo: list[tuple[int, int]]) -> dict[str, list]:
    """Object refs of the modules of in-memory models that have chunks to compute, one put per fingerprint.

    Wrapped in a list so Ray hands the actor the reference, not the module, at construction: an actor fetches
    a module only when a chunk of that model reaches it.
    """
    out: dict[str, list] = {}
    for p in sorted({p for p, _ in todo}):
        ref = plans[p].model
        if ref.in_memory and ref.fingerprint not in out:
            out[ref.fingerprint] = [ray.put(ref.module)]
    return out


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
    :func:`rcat_ray.runtime.interrupts.sigterm_as_interrupt`, releases the actor pool as a failure does and raises
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

    # started only now that some chunk must be computed (a no-op when Ray is up); looked up at call time, so a
    # test that replaces it sees every call
    cluster.ensure_ray(compute)
    total = sum(len(plan.chunks()) for plan in plans)
    stored_before = stored_chunks(default=total - len(todo))
    workers = min(compute.num_workers, len(todo))
    progress = Progress("evaluate", total, "chunks", done=stored_before)
    names = sorted({plans[p].model.name for p, _ in todo})
    actors = f"{workers} actor{'s' if workers != 1 else ''}"
    progress_log.info(progress.line(f"{len(todo)} to compute on {actors}; {', '.join(names)}"))
    finished: list[tuple[int, int]] = []
    failure = interrupted = None
    modules = ds = pipeline = batches = None
    in_flight = compute.chunks_in_flight
    # Read-ahead in a second thread pays off on a GPU, where the attack leaves the CPU idle. On CPU actors the
    # queued chunk simply waits; a threaded actor whose call fails also outlived its pool here (its CPU stayed
    # taken and a later 2-worker Ray Train run waited for ever), so threads are used only where they help.
    threaded = in_flight > 1 and compute.gpus_per_worker > 0
    try:
        specs = [plan.spec() for plan in plans]
        modules = _in_memory_modules(plans, todo)
        # ordered by plan: the pool finishes one model's chunks before it starts the next model's
        chunking = {p: plans[p].chunks() for p in {p for p, _ in todo}}
        items = [
            {"plan": p, "chunk_id": c, "start": chunking[p][c].start, "stop": chunking[p][c].stop}
            for p, c in sorted(todo)
        ]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        pipeline = ds.map_batches(
            ChunkEvaluator,
            fn_constructor_kwargs={
                "specs": specs,
                "modules": modules,
                "store_uri": store.uri if "://" in store.uri else store.root,
                "device": compute.device,
                "threads": compute.threads,
                "keep_adversarial": keep_adversarial,
            },
            batch_size=1,
            # k chunks in flight per actor, run in k threads of which one attacks at a time (the others read
            # ahead); k = 1 keeps the actor single-threaded
            compute=ray.data.ActorPoolStrategy(
                size=workers,
                max_tasks_in_flight_per_actor=in_flight,
                max_concurrent_calls_per_actor=in_flight if threaded else None,
                enable_true_multi_threading=threaded,
            ),
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
        # one line naming the cause (the OSError in the worker), not Ray's traceback text around it
        failure = describe_failure(err)
    if failure is not None or interrupted is not None:
        # The exception's traceback holds the pipeline, whose actors keep their CPUs/GPUs for as long as it
        # lives (a caller that keeps the error would starve later Ray work): drop every reference to it,
        # including the half-consumed iterator, and raise a plain exception instead.
        try:
            if batches is not None and hasattr(batches, "close"):
                batches.close()
            del batches, pipeline, ds, modules
            gc.collect()
            _kill_stranded_actors()
        except KeyboardInterrupt:  # a second Ctrl+C while releasing: the references go when this frame does
            pass
    if interrupted is not None:  # no progress line: the one-line interrupt message says what is stored
        stored = stored_chunks(default=stored_before + len(finished))
        raise EvaluationInterrupted(stored, total, interrupted) from None
    if failure is not None:
        raise EvaluationRunError(
            f"the evaluation stopped: {failure}; finished chunks are stored; run again to compute the rest"
        )
    progress.close()
    log.info("computed %d chunks", len(finished))
    return finished
