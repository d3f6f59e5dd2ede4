"""Evaluation plans: what to attack, in which fixed chunks, and where the results live in the store.

Ray-free on purpose: the Ray layer only decides *where* a chunk runs; what a chunk computes (its samples,
seed, store path) is decided here, so a chunk gives the same rows in a Ray actor, in a plain loop or on any
number of workers. What travels to a worker is a :class:`PlanSpec` (a set location, a model reference, the
attack) and chunk descriptors, never images or weights. The table is done when ``manifest.json`` (written
after ``table.parquet``) exists and the table matches its checksum; a damaged one is moved to quarantine and
reassembled from its chunks (:mod:`.chunks`, :mod:`.worker`, :mod:`.assembly`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rcat_ray.config import AttackConfig, EvaluationSettings, stable_hash
from rcat_ray.core.models import LoadedModel, ModelRef
from rcat_ray.core.samples import SampleSet
from rcat_ray.errors import EvaluationRunError
from rcat_ray.evaluate.assembly import assemble
from rcat_ray.evaluate.chunks import (
    TABLE_MEMBERS,
    Chunk,
    Rows,
    Samples,
    check_chunk,
    chunk_file_names,
    read_rows,
    sample_ids,
)
from rcat_ray.evaluate.worker import ModelCache, resolve_device, run_chunk, worker_memory
from rcat_ray.store.result_store import ResultStore, now_iso, package_versions

#: The plan and, for the callers that import them from here, the chunk-level names it is built with.
__all__ = [
    "TABLE_MEMBERS",
    "TABLE_VERSION",
    "Chunk",
    "EvaluationPlan",
    "ModelCache",
    "PlanSpec",
    "Rows",
    "Samples",
    "assemble",
    "check_chunk",
    "chunk_file_names",
    "read_rows",
    "resolve_device",
    "run_chunk",
    "sample_ids",
    "worker_memory",
]

#: Bump when the meaning of a per-model table changes, so old cache entries are not reused.
#: 2: every artifact's manifest records the sha256 of its files; chunks have their own manifest.
#: 3: ``min_margin``, the lowest margin the attacks reached (near-flips).
TABLE_VERSION = 3


class TableAddress:
    """Where a per-model table with key ``self.key`` lives in the store (a plan's, or a seed ensemble's)."""

    key: str

    @property
    def folder(self) -> str:
        return f"tables/{self.key}"

    @property
    def table_path(self) -> str:
        return f"{self.folder}/table.parquet"

    @property
    def manifest_path(self) -> str:
        return f"{self.folder}/manifest.json"

    def table_done(self, store: ResultStore) -> bool:
        """Whether the table is stored and matches its manifest's checksum (:func:`table_artifact_done`)."""
        return table_artifact_done(store, self.folder)


@dataclass
class EvaluationPlan(TableAddress):
    """Everything that determines one model's per-model table, and its address in the store.

    ``model`` is a :class:`ModelRef` in a run (the driver keeps no weights of models it can reload) or a
    ``LoadedModel`` (tests, one-process use); ``samples`` a prepared set or an in-memory split. The identity
    uses ``samples.describe()``, which a set computes from its description without reading a pixel and which
    equals ``Split.describe()`` of the same samples, so keys do not depend on which of the two a run holds.
    """

    model: ModelRef | LoadedModel
    samples: Samples
    attack: AttackConfig
    chunk_size: int
    key: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.identity = {
            "table_version": TABLE_VERSION,
            "model_fingerprint": self.model.fingerprint,
            "data": self.samples.describe(),
            "attack": self.attack.model_dump(mode="json"),
            "chunk_size": self.chunk_size,
        }
        self.key = stable_hash(self.identity, length=24)

    def spec(self) -> PlanSpec:
        """What a worker needs to run this plan's chunks: a few hundred bytes, no images and no weights."""
        if not isinstance(self.samples, SampleSet):
            raise TypeError("only a plan over a prepared sample set can run on workers (workflows.prepare makes one)")
        model = self.model
        if isinstance(model, LoadedModel):
            raise TypeError("a plan that runs on workers refers to its model by a ModelRef (workflows.prepare)")
        return PlanSpec(self.key, model.without_module(), self.samples.uri, self.attack, self.chunk_size)

    # -- addresses (the table's own: TableAddress) -------------------------------------------------
    @property
    def chunks_folder(self) -> str:
        return f"{self.folder}/chunks"

    def chunk_path(self, chunk_id: int) -> str:
        return f"{self.chunks_folder}/{chunk_file_names(chunk_id)[1]}"

    def adversarial_path(self, chunk_id: int) -> str:
        return f"{self.chunks_folder}/{chunk_file_names(chunk_id)[2]}"

    def chunk_manifest_path(self, chunk_id: int) -> str:
        return f"{self.chunks_folder}/{chunk_file_names(chunk_id)[0]}"

    # -- work units --------------------------------------------------------------------------------
    def chunks(self) -> list[Chunk]:
        n = len(self.samples)
        return [Chunk(i, s, min(s + self.chunk_size, n)) for i, s in enumerate(range(0, n, self.chunk_size))]

    def chunk_done(self, store: ResultStore, chunk: Chunk) -> bool:
        """Whether another worker (or an earlier run) already stored this chunk: its manifest exists."""
        return store.exists(self.chunk_manifest_path(chunk.chunk_id))

    def missing_chunks(self, store: ResultStore, *, verify: bool = True) -> list[Chunk]:
        """Chunks that are not done: the only ones a (re-)run computes.

        With ``verify`` each chunk with a manifest is checked against it and a damaged one is moved aside
        (and so counted missing); without, one folder listing tells which manifests exist: enough when the
        table itself is good and the chunks only need to be complete again.
        """
        present = set(store.list_files(self.chunks_folder))
        missing = []
        for c in self.chunks():
            if chunk_file_names(c.chunk_id)[0] not in present:
                missing.append(c)
            elif verify:
                manifest, problems = check_chunk(store, self.chunks_folder, c.chunk_id)
                if manifest is None or problems:
                    missing.append(c)
        return missing

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


def table_artifact_done(store: ResultStore, folder: str) -> bool:
    """Whether the per-model table in ``folder`` is stored and matches its manifest's checksum.

    A damaged table (or manifest) is moved aside with a warning and reported as not done, so the caller
    rebuilds it instead of reusing it because it exists.
    """
    manifest, problems = store.check_artifact(folder)
    if problems:
        store.quarantine_artifact(folder, "manifest.json", TABLE_MEMBERS, problems, manifest)
        return False
    return manifest is not None


@dataclass(frozen=True)
class PlanSpec:
    """A plan as a worker receives it: the table key, a model reference, where the samples are, the attack.

    The worker rebuilds the plan from the set it opens at ``samples`` and checks that the key comes out equal:
    a set replaced or damaged since the driver planned (another ``describe()``) would otherwise file rows under
    a key they do not belong to.
    """

    key: str
    model: ModelRef
    samples: str  # location of the prepared sample set (a path or URI every node reads)
    attack: AttackConfig
    chunk_size: int

    def open(self, samples: SampleSet) -> EvaluationPlan:
        """The plan over ``samples`` (opened by the caller, who may cache it per location)."""
        plan = EvaluationPlan(self.model, samples, self.attack, self.chunk_size)
        if plan.key != self.key:
            raise EvaluationRunError(
                f"the sample set at {self.samples} no longer matches the one the run was planned with (table "
                f"{self.key}, now {plan.key}): it was replaced during the run; run again"
            )
        return plan
