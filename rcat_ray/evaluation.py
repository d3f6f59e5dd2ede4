"""Evaluation plans: what to attack, in which fixed chunks, and where the results live in the store.

Ray-free on purpose: the Ray layer only decides *where* a chunk runs; everything that decides *what* a
chunk computes (its samples, its seed, its store path) is here, so a chunk gives the same rows whether it
runs in a Ray actor, in a plain loop, or on a different number of workers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rcat_ray.config import AttackConfig, EvaluationSettings, stable_hash
from rcat_ray.core.attacks import PER_MODEL_SCHEMA, chunk_seed, evaluate_chunk
from rcat_ray.core.data import Split
from rcat_ray.core.models import LoadedModel
from rcat_ray.store import ResultStore, StoreError, now_iso, package_versions

#: Bump when the meaning of a per-model table changes, so old cache entries are not reused.
TABLE_VERSION = 1


class EvaluationInputError(ValueError):
    """Inputs that cannot be evaluated together (caught before any attack runs)."""


class EvaluationRunError(RuntimeError):
    """A chunk failed on a worker; the chunks finished before it are kept in the store."""


def resolve_device(device: str) -> torch.device:
    """``auto`` means the GPU when this process has one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvaluationInputError("device 'cuda' was requested but this worker has no GPU")
    return torch.device(device)


@dataclass(frozen=True)
class Chunk:
    """A fixed work unit: positions [start, stop) of the split."""

    chunk_id: int
    start: int
    stop: int


@dataclass
class EvaluationPlan:
    """Everything that determines one model's per-model table, and its address in the store."""

    model: LoadedModel
    split: Split
    attack: AttackConfig
    chunk_size: int
    key: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.identity = {
            "table_version": TABLE_VERSION,
            "model_fingerprint": self.model.fingerprint,
            "data": self.split.describe(),
            "attack": self.attack.model_dump(mode="json"),
            "chunk_size": self.chunk_size,
        }
        self.key = stable_hash(self.identity, length=24)

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def folder(self) -> str:
        return f"tables/{self.key}"

    @property
    def table_path(self) -> str:
        return f"{self.folder}/table.parquet"

    def chunk_path(self, chunk_id: int) -> str:
        return f"{self.folder}/chunks/chunk-{chunk_id:06d}.parquet"

    def adversarial_path(self, chunk_id: int) -> str:
        return f"{self.folder}/chunks/adv-{chunk_id:06d}.npz"

    # -- work units --------------------------------------------------------------------------------
    def chunks(self) -> list[Chunk]:
        n = len(self.split)
        return [Chunk(i, s, min(s + self.chunk_size, n)) for i, s in enumerate(range(0, n, self.chunk_size))]

    def missing_chunks(self, store: ResultStore) -> list[Chunk]:
        """Chunks without a stored result: the only ones a (re-)run computes."""
        done = set(store.list_files(f"{self.folder}/chunks"))
        return [c for c in self.chunks() if self.chunk_path(c.chunk_id).rsplit("/", 1)[1] not in done]

    def manifest(self, settings: EvaluationSettings | None = None) -> dict[str, Any]:
        return {
            "kind": "per-model-table",
            "key": self.key,
            **self.identity,
            "model": self.model.describe(),
            "threat_model": {"norm": self.attack.norm, "eps": self.attack.eps},
            "attacks": list(self.attack.cascade),
            "seed": self.attack.seed,
            "versions": package_versions(),
            "created_at": now_iso(),
            "settings": settings.model_dump(mode="json", exclude={"compute"}) if settings else None,
        }


def run_chunk(
    plan: EvaluationPlan, chunk: Chunk, store: ResultStore, *, device: torch.device, keep_adversarial: bool
) -> int:
    """Attack one chunk and store its rows (and adversarial images). Returns the number of rows.

    Idempotent: a chunk whose result already exists is not recomputed by the planner, and a finished
    chunk file is never overwritten.
    """
    sl = slice(chunk.start, chunk.stop)
    positions = torch.arange(chunk.start, chunk.stop)
    limit = plan.attack.robust_samples
    mask = positions < limit if limit is not None else torch.ones(len(positions), dtype=torch.bool)
    result = evaluate_chunk(
        plan.model.module,
        plan.split.images[sl],
        plan.split.labels[sl],
        plan.split.sample_ids[sl],
        plan.attack,
        num_classes=plan.model.num_classes,
        seed=chunk_seed(plan.attack.seed, chunk.chunk_id),
        attack_mask=mask,
        device=device,
        keep_adversarial=keep_adversarial,
    )
    if keep_adversarial and result.adversarial is not None and len(result.adversarial_ids):
        buf = io.BytesIO()
        np.savez(buf, sample_id=result.adversarial_ids, images=result.adversarial)  # float noise compresses poorly
        store.put_bytes(plan.adversarial_path(chunk.chunk_id), buf.getvalue())
    # the rows file goes last: its presence is what marks the chunk as done
    store.put_table(plan.chunk_path(chunk.chunk_id), result.table)
    return result.table.num_rows


def assemble(plan: EvaluationPlan, store: ResultStore, settings: EvaluationSettings | None = None) -> None:
    """Join the finished chunks into the per-model table and its manifest (written once; a no-op after)."""
    if store.exists(plan.table_path):
        return
    missing = plan.missing_chunks(store)
    if missing:
        raise StoreError(f"cannot assemble {plan.key}: {len(missing)} chunks are not computed yet")
    parts = [store.read_table(plan.chunk_path(c.chunk_id)) for c in plan.chunks()]
    table = pa.concat_tables(parts).cast(PER_MODEL_SCHEMA).sort_by("sample_id")
    expected = plan.split.sample_ids.numpy()
    if not np.array_equal(table.column("sample_id").to_numpy(), expected):
        raise StoreError(f"chunks of {plan.key} do not cover the split's sample ids exactly")
    manifest = plan.manifest(settings)
    store.put_json(f"{plan.folder}/manifest.json", manifest)
    store.put_table(plan.table_path, table, metadata_=manifest)


def load_adversarial(store: ResultStore, plan_key: str, sample_ids: list[int]) -> dict[int, np.ndarray]:
    """Adversarial images of some samples of a stored table (for reports); absent ones are skipped."""
    wanted = set(int(i) for i in sample_ids)
    out: dict[int, np.ndarray] = {}
    folder = f"tables/{plan_key}/chunks"
    for name in store.list_files(folder):
        if not name.startswith("adv-") or not wanted - set(out):
            continue
        with np.load(io.BytesIO(store.read_bytes(f"{folder}/{name}"))) as z:
            ids = z["sample_id"]
            hits = np.nonzero(np.isin(ids, list(wanted)))[0]
            if len(hits):
                images = z["images"]
                for h in hits:
                    out[int(ids[h])] = images[h]
    return out


def validate_pair_inputs(models: list[LoadedModel], split: Split) -> None:
    """Fail before any attack when a model cannot run on this data or models disagree on classes.

    One clean forward of two samples checks the input shape and the number of logits.
    """
    if len(split) == 0:
        raise EvaluationInputError("the data selection is empty")
    classes = {m.num_classes for m in models}
    if len(classes) > 1:
        names = ", ".join(f"{m.name}={m.num_classes}" for m in models)
        raise EvaluationInputError(f"models disagree on the number of classes: {names}")
    probe = split.images[:2]
    for m in models:
        try:
            with torch.no_grad():
                out = m.module.to("cpu").eval()(probe)
        except Exception as err:  # noqa: BLE001 - any failure here means "does not fit the data"
            raise EvaluationInputError(
                f"model '{m.name}' cannot run on {split.dataset} inputs of shape {tuple(probe.shape[1:])}: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        if out.ndim != 2 or out.shape[1] != m.num_classes:
            raise EvaluationInputError(
                f"model '{m.name}' returns {tuple(out.shape[1:])} logits, expected {m.num_classes}"
            )
        if m.num_classes != split.num_classes:
            raise EvaluationInputError(
                f"model '{m.name}' has {m.num_classes} classes but {split.dataset} has {split.num_classes}"
            )
