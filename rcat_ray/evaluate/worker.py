"""What a worker does with one chunk: load the model (a few cached), read the chunk's rows, attack them, refuse
non-finite outputs, and store the rows, the adversarial images and, last, the chunk's manifest."""

from __future__ import annotations

import io
import os
import platform
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from rcat_ray.core.attacks import chunk_seed, evaluate_chunk
from rcat_ray.core.models import LoadedModel, ModelRef, load_reference
from rcat_ray.errors import EvaluationInputError, EvaluationRunError, NonFiniteOutputError
from rcat_ray.evaluate.chunks import Chunk, Rows, chunk_file_names, read_rows
from rcat_ray.store.result_store import ResultStore, json_bytes, now_iso, parquet_bytes

if TYPE_CHECKING:
    from rcat_ray.evaluate.plan import EvaluationPlan


def resolve_device(device: str) -> torch.device:
    """``auto`` means the GPU when this process has one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError("device 'cuda' was requested but this worker has no GPU")
    return torch.device(device)


class ModelCache:
    """The few models a worker holds, least recently used first out, keyed by fingerprint.

    Chunks arrive grouped by model, so a worker loads each model once and holds at most ``capacity`` of them (the
    model it attacks and the next one, while chunks of both are in flight); every load is checked against the
    planned fingerprint (:func:`rcat_ray.core.models.load_reference`).
    """

    def __init__(self, capacity: int = 2):
        self.capacity = max(1, capacity)
        self._modules: OrderedDict[str, nn.Module] = OrderedDict()
        self.loads = 0

    def get(self, ref: ModelRef | LoadedModel, fetch_module: Callable[[], nn.Module] | None = None) -> nn.Module:
        """The module of ``ref``; an in-memory model's weights come from ``fetch_module`` (the object store)."""
        if isinstance(ref, LoadedModel):
            return ref.module
        if ref.fingerprint in self._modules:
            self._modules.move_to_end(ref.fingerprint)
            return self._modules[ref.fingerprint]
        if ref.in_memory and ref.module is None and fetch_module is not None:
            ref = replace(ref, module=fetch_module())
        while len(self._modules) >= self.capacity:  # free the old one before the new one is loaded
            self._modules.popitem(last=False)
        module = load_reference(ref).module
        self._modules[ref.fingerprint] = module
        self.loads += 1
        return module


def worker_memory(device: torch.device) -> dict[str, int | None]:
    """This process's peak resident memory (and peak CUDA memory): recorded per chunk, it is what tells how
    large ``chunk_size`` may be on a worker, and that a worker's memory does not grow with the dataset."""
    peak = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, the only other host
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"max_rss_bytes": peak, "cuda_max_allocated_bytes": cuda}


def run_chunk(
    plan: EvaluationPlan,
    chunk: Chunk,
    store: ResultStore,
    *,
    device: torch.device,
    keep_adversarial: bool,
    module: nn.Module | None = None,
    rows: Rows | None = None,
    node: str | None = None,
) -> int:
    """Attack one chunk and store its rows (and adversarial images). Returns the number of rows.

    ``module`` and ``rows`` are what a worker already holds (a cached model, rows it read ahead); without them
    the plan's own model and samples are used (one-process use). ``node`` names where the chunk ran (the Ray
    node id on a cluster; default this host's name): with several Ray nodes on one machine the host alone does
    not tell them apart.

    Idempotent: a chunk whose manifest already exists (another worker finished it) is not recomputed, and a
    finished chunk file is never overwritten. Outputs are checked for NaN/inf before anything is written, so
    a broken model leaves no chunk behind. The chunk manifest is written last: it is the "done" marker.
    """
    if plan.chunk_done(store, chunk):
        return chunk.stop - chunk.start
    if module is None:
        module = plan.model.module if plan.model.module is not None else load_reference(plan.model).module
    images, labels, ids = rows if rows is not None else read_rows(plan.samples, chunk.start, chunk.stop)
    if len(ids) != chunk.stop - chunk.start:
        raise EvaluationRunError(f"chunk {chunk.chunk_id} read {len(ids)} rows, expected {chunk.stop - chunk.start}")
    positions = torch.arange(chunk.start, chunk.stop)
    limit = plan.attack.robust_samples
    mask = positions < limit if limit is not None else torch.ones(len(positions), dtype=torch.bool)
    seed = chunk_seed(plan.attack.seed, chunk.chunk_id)
    result = evaluate_chunk(
        module,
        images,
        labels,
        ids,
        plan.attack,
        num_classes=plan.model.num_classes,
        seed=seed,
        attack_mask=mask,
        device=device,
        keep_adversarial=keep_adversarial,
    )
    _check_finite(plan, chunk, result.table, result.adversarial)
    _, rows_name, adv_name = chunk_file_names(chunk.chunk_id)
    files = {}
    if keep_adversarial and result.adversarial is not None and len(result.adversarial_ids):
        buf = io.BytesIO()
        np.savez(buf, sample_id=result.adversarial_ids, images=result.adversarial)  # float noise compresses poorly
        files[adv_name] = store.write_member(plan.adversarial_path(chunk.chunk_id), buf.getvalue())
    files[rows_name] = store.write_member(plan.chunk_path(chunk.chunk_id), parquet_bytes(result.table))
    store.put_bytes(
        plan.chunk_manifest_path(chunk.chunk_id),
        json_bytes(
            {
                "kind": "chunk",
                "table_key": plan.key,
                "model": plan.model.name,
                "chunk_id": chunk.chunk_id,
                "start": chunk.start,
                "stop": chunk.stop,
                "seed": seed,
                "n_rows": result.table.num_rows,
                "sanity": result.sanity,
                "files": files,
                "node": node or platform.node(),
                "host": platform.node(),
                "pid": os.getpid(),
                "memory": worker_memory(torch.device(device)),
                "created_at": now_iso(),
            }
        ),
    )
    return result.table.num_rows


def _check_finite(plan: EvaluationPlan, chunk: Chunk, table: pa.Table, adversarial: np.ndarray | None) -> None:
    """Refuse a chunk whose margins (hence logits) or adversarial images are NaN or inf.

    Such rows would be stored forever under the model's fingerprint and make every comparison with it silently
    wrong (a NaN margin is "not correct" for the flags), so the chunk fails loudly instead.
    """
    labels = {"clean_margin": "clean margins", "adv_margin": "adversarial margins"}
    counts = {
        label: int((~np.isfinite(table.column(col).drop_null().to_numpy())).sum()) for col, label in labels.items()
    }
    if adversarial is not None:
        bad = ~np.isfinite(adversarial)
        counts["adversarial images"] = int(bad.any(axis=tuple(range(1, bad.ndim))).sum()) if bad.ndim > 1 else 0
    if any(counts.values()):
        detail = ", ".join(f"{n} non-finite {label}" for label, n in counts.items() if n)
        raise NonFiniteOutputError(
            f"model '{plan.model.name}' gave non-finite outputs (NaN or inf) on chunk {chunk.chunk_id} "
            f"(samples at positions {chunk.start}..{chunk.stop - 1}): {detail}; its weights are probably damaged. "
            "Nothing was stored for this chunk."
        )
