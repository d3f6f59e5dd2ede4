"""Chunks, the fixed work units of a plan: their files in the store, the check that one is done, and the rows
of either kind of samples by position.

A chunk is *done* when its manifest ``chunks/chunk-000007.json`` exists and its files match the sha256 and
size recorded there; the worker writes that manifest last, so a chunk whose rows exist without a manifest is
simply not done. A damaged chunk is moved to the store's quarantine and attacked again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from rcat_ray.core.data import Split
from rcat_ray.core.samples import SampleSet
from rcat_ray.store.result_store import ResultStore

#: The files of a finished table besides its manifest.
TABLE_MEMBERS = ("table.parquet",)


def chunk_file_names(chunk_id: int) -> tuple[str, str, str]:
    """The files of one chunk inside ``chunks/``: its manifest, its rows and its adversarial images."""
    return f"chunk-{chunk_id:06d}.json", f"chunk-{chunk_id:06d}.parquet", f"adv-{chunk_id:06d}.npz"


#: A chunk manifest's file name (the one that marks the chunk done); group 1 is the chunk id.
CHUNK_MANIFEST = re.compile(r"^chunk-(\d{6})\.json$")


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
