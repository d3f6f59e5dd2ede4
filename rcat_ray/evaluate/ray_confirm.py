"""A confirmation's re-attacks on Ray: one task per side (old and new at once), each with an evaluation
worker's resources, reading its flips' rows from the store itself; only their per-sample rows come back."""

from __future__ import annotations

import pyarrow as pa
import ray

from rcat_ray.config import AttackConfig, ComputeConfig
from rcat_ray.core.models import ModelRef
from rcat_ray.evaluate.confirm import attack_side
from rcat_ray.runtime import cluster


def attack_sides(
    jobs: dict[str, tuple[ModelRef, list[int]]],
    samples_location: str,
    attack: AttackConfig,
    chunk_size: int,
    compute: ComputeConfig,
) -> dict[str, pa.Table]:
    """side -> the rows of that side's model re-attacked on its sample ids."""
    cluster.ensure_ray(compute)
    task = ray.remote(num_cpus=compute.cpus_per_worker, num_gpus=compute.gpus_per_worker, max_retries=1)(
        _attack_side_with_threads
    )
    threads = compute.threads_per_worker or max(1, int(compute.cpus_per_worker))
    refs = {
        side: task.remote(model, samples_location, ids, attack, chunk_size, compute.device, threads)
        for side, (model, ids) in jobs.items()
    }
    return {side: ray.get(ref) for side, ref in refs.items()}


def _attack_side_with_threads(model, location, ids, attack, chunk_size, device, threads) -> pa.Table:
    import torch

    torch.set_num_threads(threads)  # fixed, as in evaluation actors: the rows do not depend on the host
    return attack_side(model, location, ids, attack, chunk_size, device)
