"""Evaluation plans: what to attack, in which fixed chunks, and where the results live in the store.

Ray-free on purpose: the Ray layer only decides *where* a chunk runs; everything that decides *what* a
chunk computes (its samples, its seed, its store path) is here, so a chunk gives the same rows whether it
runs in a Ray actor, in a plain loop, or on a different number of workers.

Integrity (see ``rcat_ray.store.result_store``): a chunk is *done* when its manifest ``chunks/chunk-000007.json`` exists
and its files match the sha256 and size recorded there; the worker writes that manifest last, after the rows
and the adversarial images, so a chunk whose rows exist without a manifest is simply not done. The table is
done when ``manifest.json`` (written after ``table.parquet``) exists and the table matches its checksum.
A damaged table or chunk is moved to the store's quarantine folder and treated as missing: the table is
reassembled from its chunks, the chunk is attacked again. A model that gives NaN or inf logits is refused
before any attack, and a chunk with non-finite outputs is never stored.

Data plane. A plan's samples are a prepared sample set (:mod:`rcat_ray.core.samples`) in the result store,
the one place every node reaches; a worker reads the rows of its own chunk (positions [start, stop)) from
there, and loads the model from its source (:class:`rcat_ray.core.models.ModelRef`), so what travels to a
worker is a :class:`PlanSpec` (a location, a model reference, the attack) and chunk descriptors, never images
or weights. A plan over an in-memory ``Split`` still works in one process (tests, the Python API).
"""

from __future__ import annotations

import io
import os
import platform
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from rcat_ray.config import AttackConfig, EvaluationSettings, stable_hash
from rcat_ray.core.attacks import PER_MODEL_SCHEMA, chunk_seed, evaluate_chunk
from rcat_ray.core.data import Split
from rcat_ray.core.models import LoadedModel, ModelRef, load_reference
from rcat_ray.core.samples import SampleSet
from rcat_ray.errors import (
    DamagedArtifactError,
    EvaluationInputError,
    EvaluationRunError,
    NonFiniteOutputError,
    StoreError,
)
from rcat_ray.store.result_store import (
    ResultStore,
    json_bytes,
    now_iso,
    package_versions,
    parquet_bytes,
    table_from_bytes,
)

#: Bump when the meaning of a per-model table changes, so old cache entries are not reused.
#: 2: every artifact's manifest records the sha256 of its files; chunks have their own manifest.
TABLE_VERSION = 2

#: The files of a finished table besides its manifest.
TABLE_MEMBERS = ("table.parquet",)


def chunk_file_names(chunk_id: int) -> tuple[str, str, str]:
    """The files of one chunk inside ``chunks/``: its manifest, its rows and its adversarial images."""
    return f"chunk-{chunk_id:06d}.json", f"chunk-{chunk_id:06d}.parquet", f"adv-{chunk_id:06d}.npz"


def check_chunk(store: ResultStore, chunks_folder: str, chunk_id: int, *, deep: bool = False, repair: bool = True):
    """Whether a chunk is done: its manifest exists and its files match it. Returns (manifest or None, problems).

    The rows are always hashed (they are small and assembling reads them anyway); the adversarial images
    only have their size compared unless ``deep``, because they can be large and are hashed whenever a report
    reads them. With ``repair``, a damaged chunk is moved aside, so it becomes missing and is recomputed.
    """
    manifest_name, *members = chunk_file_names(chunk_id)
    manifest, problems = store.check_artifact(chunks_folder, manifest_name, size_only=() if deep else (".npz",))
    if problems and repair:
        store.quarantine_artifact(chunks_folder, manifest_name, members, problems, manifest)
    return manifest, problems


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


#: What a plan evaluates: a prepared sample set (streamed by position) or an in-memory split (one process).
Samples = SampleSet | Split
#: Rows of a chunk: (images float32 [n,C,H,W], labels int64 [n], sample_ids int64 [n]).
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def read_rows(samples: Samples, start: int, stop: int) -> Rows:
    """Positions [start, stop) of either kind of samples, as the same tensors (a set decodes bit-identically)."""
    if isinstance(samples, SampleSet):
        return samples.read_rows(start, stop)
    sl = slice(start, stop)
    return samples.images[sl], samples.labels[sl], samples.sample_ids[sl]


def sample_ids(samples: Samples) -> np.ndarray:
    """Every sample id in position order: for a set, only its int64 id column is read (never the pixels)."""
    if isinstance(samples, Split):
        return samples.sample_ids.numpy()
    parts = []
    for path in samples.files:
        with samples.filesystem.open_input_file(path) as f:
            # unthreaded: a few kB per file, and pyarrow's pool threads can abort the interpreter at exit
            ids = pq.ParquetFile(f).read(columns=["sample_id"], use_threads=False).column("sample_id")
            parts.append(ids.to_numpy())
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


@dataclass
class EvaluationPlan:
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

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def folder(self) -> str:
        return f"tables/{self.key}"

    @property
    def table_path(self) -> str:
        return f"{self.folder}/table.parquet"

    @property
    def manifest_path(self) -> str:
        return f"{self.folder}/manifest.json"

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

    def table_done(self, store: ResultStore) -> bool:
        """Whether the table is stored and matches its manifest's checksum.

        A damaged table (or manifest) is moved aside with a warning and reported as not done, so the caller
        reassembles it from its chunks instead of reusing it because it exists.
        """
        manifest, problems = store.check_artifact(self.folder)
        if problems:
            store.quarantine_artifact(self.folder, "manifest.json", TABLE_MEMBERS, problems, manifest)
            return False
        return manifest is not None

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
        json_bytes({
            "kind": "chunk",
            "table_key": plan.key,
            "model": plan.model.name,
            "chunk_id": chunk.chunk_id,
            "start": chunk.start,
            "stop": chunk.stop,
            "seed": seed,
            "n_rows": result.table.num_rows,
            "files": files,
            "node": node or platform.node(),
            "host": platform.node(),
            "pid": os.getpid(),
            "memory": worker_memory(torch.device(device)),
            "created_at": now_iso(),
        }),
    )  # fmt: skip
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


def assemble(plan: EvaluationPlan, store: ResultStore, settings: EvaluationSettings | None = None) -> None:
    """Join the finished chunks into the per-model table and its manifest (written once; a no-op after).

    A stored table that fails its checksum is moved aside and rebuilt here from the chunks; every chunk is
    read through its own checksum, so a damaged chunk is moved aside (and reported missing) instead of
    leaking into the table. The manifest, holding the table's sha256, is written last. Two runs assembling the
    same table at once write identical bytes (no time or run-specific field inside the file), so neither
    mistakes the other's table for damage.
    """
    if plan.table_done(store):
        return
    parts, missing = [], 0
    for c in plan.chunks():
        rows = _read_chunk_rows(plan, store, c)
        if rows is None:
            missing += 1
        else:
            parts.append(rows)
    if missing:
        raise StoreError(f"cannot assemble {plan.key}: {missing} chunks are not computed yet")
    table = pa.concat_tables(parts).cast(PER_MODEL_SCHEMA).sort_by("sample_id")
    expected = sample_ids(plan.samples)
    if not np.array_equal(table.column("sample_id").to_numpy(), expected):
        raise StoreError(f"chunks of {plan.key} do not cover the split's sample ids exactly")
    if plan.table_done(store):
        return  # another run assembled it while this one read the chunks: its table is the same, keep it
    # The file's own metadata holds only what the key determines, so every run assembling this table writes the
    # same bytes: a run racing another one then finds a table equal to its own (kept, not quarantined as a
    # leftover), and either manifest matches it. Who assembled it, when, with which versions and under which
    # model name stay in the manifest.
    identity = {"kind": "per-model-table", "key": plan.key, **plan.identity}
    record = store.write_member(plan.table_path, parquet_bytes(table, identity))
    store.put_json(plan.manifest_path, {**plan.manifest(settings), "files": {TABLE_MEMBERS[0]: record}})


def _read_chunk_rows(plan: EvaluationPlan, store: ResultStore, chunk: Chunk) -> pa.Table | None:
    """A done chunk's rows, read through their checksum (one read, hashed on the way); None when the chunk is
    missing or damaged (then moved aside). The chunk's other files only have their size checked here."""
    folder = plan.chunks_folder
    manifest_name, rows_name, adv_name = chunk_file_names(chunk.chunk_id)
    manifest = None
    try:
        manifest = store.read_manifest(f"{folder}/{manifest_name}")
        if manifest is None:
            return None
        for name in manifest["files"]:
            problem = None if name == rows_name else store.check_member(folder, name, manifest, full=False)
            if problem:
                raise DamagedArtifactError(f"{folder}/{name}", problem, store.uri)
        return table_from_bytes(store.read_verified(folder, rows_name, manifest))
    except DamagedArtifactError as err:
        store.quarantine_artifact(folder, manifest_name, (rows_name, adv_name), [(err.path, err.problem)], manifest)
        return None


def validate_pair_inputs(models: list[LoadedModel], split: Split) -> None:
    """Fail before any attack when a model cannot run on this data or models disagree on classes.

    One clean forward of two samples checks the input shape, the number of logits and that the logits are
    finite: a checkpoint with NaN weights would otherwise be attacked and stored as a table of garbage.
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
        bad_weights = [
            name for name, t in m.module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()
        ]
        if bad_weights or not torch.isfinite(out).all():
            where = f" (non-finite values in {', '.join(bad_weights[:3])}{', ...' if len(bad_weights) > 3 else ''})"
            raise EvaluationInputError(
                f"model '{m.name}' gives non-finite logits (NaN or inf) on clean {split.dataset} inputs"
                f"{where if bad_weights else ''}: its weights are probably damaged"
            )
        if m.num_classes != split.num_classes:
            raise EvaluationInputError(
                f"model '{m.name}' has {m.num_classes} classes but {split.dataset} has {split.num_classes}"
            )
