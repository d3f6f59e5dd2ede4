"""Assembling a per-model table from its finished chunks, once; every chunk read through its checksum."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rcat_ray.config import EvaluationSettings
from rcat_ray.core.attack_checks import table_checks
from rcat_ray.core.attacks import PER_MODEL_SCHEMA
from rcat_ray.errors import DamagedArtifactError, StoreError
from rcat_ray.evaluate.chunks import TABLE_MEMBERS, Chunk, chunk_file_names, sample_ids
from rcat_ray.store.result_store import ResultStore, parquet_bytes, table_from_bytes

if TYPE_CHECKING:
    from rcat_ray.evaluate.plan import EvaluationPlan


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
    parts, sanity, missing = [], [], 0
    for c in plan.chunks():
        rows, chunk_manifest = _read_chunk_rows(plan, store, c)
        if rows is None:
            missing += 1
        else:
            parts.append(rows)
            sanity.append(chunk_manifest.get("sanity"))
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
    checks = table_checks(sanity, table, plan.attack.cascade)  # AutoAttack's flags, beside the rows they qualify
    store.put_json(
        plan.manifest_path, {**plan.manifest(settings), "sanity": checks, "files": {TABLE_MEMBERS[0]: record}}
    )


def _read_chunk_rows(plan: EvaluationPlan, store: ResultStore, chunk: Chunk) -> tuple[pa.Table | None, dict]:
    """A done chunk's rows, read through their checksum (one read, hashed on the way), and its manifest; no rows
    when the chunk is missing or damaged (then moved aside). The chunk's other files only have their size
    checked here."""
    folder = plan.chunks_folder
    manifest_name, rows_name, adv_name = chunk_file_names(chunk.chunk_id)
    manifest = None
    try:
        manifest = store.read_manifest(f"{folder}/{manifest_name}")
        if manifest is None:
            return None, {}
        for name in manifest["files"]:
            problem = None if name == rows_name else store.check_member(folder, name, manifest, full=False)
            if problem:
                raise DamagedArtifactError(f"{folder}/{name}", problem, store.uri)
        return table_from_bytes(store.read_verified(folder, rows_name, manifest)), manifest
    except DamagedArtifactError as err:
        store.quarantine_artifact(folder, manifest_name, (rows_name, adv_name), [(err.path, err.problem)], manifest)
        return None, {}
