"""Prepared sample sets: the samples of a selection, stored once as Parquet, read back a chunk at a time.

A sample set holds what ``load_split`` would decode, as compact pixels in a folder every node can read (a
local path, or a URI pyarrow understands: ``file://``, ``s3://``, ``gs://``), in row groups so a worker reads
only its own chunk; rows decode bit for bit to ``load_split``'s tensors. Modules: :mod:`.format` (dataset.json,
schema, hashes), :mod:`.source` (the selection as row groups), :mod:`.write` (atomic, race-safe preparation),
:mod:`.read` (:class:`SampleSet`), :mod:`.placement` (a set's place in a result store, quarantine). Pure
pyarrow + numpy + torch, no Ray. Layout and keys: docs/contracts.md and docs/architecture.md.
"""

from rcat_ray.core.samples.format import (
    FORMAT,
    FORMAT_VERSION,
    INFO_FILE,
    META_KEY,
    SCHEMA,
    TARGET_PART_BYTES,
    Batch,
    PartInfo,
    SampleSetInfo,
    decode_images,
)
from rcat_ray.core.samples.placement import (
    QUARANTINE_FOLDER,
    SAMPLES_FOLDER,
    samples_in_store,
    samples_location,
    set_aside,
)
from rcat_ray.core.samples.read import SampleSet, open_samples
from rcat_ray.core.samples.write import prepare_samples
from rcat_ray.core.sources import IMAGENET_PREPROCESSING

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGENET_PREPROCESSING",
    "INFO_FILE",
    "META_KEY",
    "QUARANTINE_FOLDER",
    "SAMPLES_FOLDER",
    "SCHEMA",
    "TARGET_PART_BYTES",
    "Batch",
    "PartInfo",
    "SampleSet",
    "SampleSetInfo",
    "decode_images",
    "open_samples",
    "prepare_samples",
    "samples_in_store",
    "samples_location",
    "set_aside",
]
