"""The rows a data config selects, as a stream of row groups ready to be written into a sample set.

Read from the dataset's own files (:mod:`rcat_ray.core.sources`) one row group at a time, so at most one row
group of pixels is held whatever the size of the selection; ``Split.fingerprint()`` of the same samples is
computed on the way, so a set describes itself exactly as ``load_split`` would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rcat_ray.config import DataConfig
from rcat_ray.core.samples.format import _FLOAT_SLICE_BYTES, SampleSetInfo
from rcat_ray.core.sources import RawSource, data_root, open_source, select, to_float, val_size_of
from rcat_ray.errors import DataError


def _selection(cfg: DataConfig) -> dict[str, Any]:
    """What determines a set's rows, as JSON: the reuse check compares it with an existing set's.

    Cheap by design (no pixel is decoded): a ``tensors`` file is identified by its sha256 (a changed file
    must not hit an old set), an ImageNet folder by its path.
    """
    sel: dict[str, Any] = {"dataset": cfg.name, "split": cfg.split, "offset": cfg.offset, "limit": cfg.limit}
    if cfg.split != "test":
        sel["val_size"] = val_size_of(cfg)
    if cfg.name == "tensors":
        path = Path(cfg.path or "").expanduser()
        if not path.is_file():
            raise DataError(f"tensors file not found: {path}")
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        sel["source"] = {"path": str(path.resolve()), "sha256": h.hexdigest()}
    elif cfg.name != "digits":  # digits ships inside scikit-learn's wheel
        sel["source"] = {"root": str(data_root(cfg).resolve())}
    return sel


@dataclass
class _Source:
    """A selection ready to be written: its static description, and a generator of its row groups that also
    computes ``Split.fingerprint()`` of what it yields (set once the generator is exhausted)."""

    info: SampleSetInfo
    groups: Any  # callable(rows_per_group) -> Iterator[(ids int64, labels int64, pixels [n,C,H,W] of dtype)]
    split_fingerprint: str | None = None


def _uint8_exact(raw: RawSource, start: int, stop: int) -> bool:
    """Whether every float pixel of rows [start, stop) is some k/255 (k in 0..255) exactly as float32
    computes it, bit for bit, so that uint8 stores it losslessly. One streaming pass, about 1 MB at a time."""
    block = max(1, _FLOAT_SLICE_BYTES // (4 * int(np.prod(raw.shape))))
    for lo in range(start, stop, block):
        x = raw.rows(lo, min(stop, lo + block))
        q = np.round(x * np.float32(255.0))
        if not bool(((q >= 0) & (q <= 255)).all()):  # NaN fails here too
            return False
        if not np.array_equal(to_float(q.astype(np.uint8), "uint8", 255.0).view(np.int32), x.view(np.int32)):
            return False  # compared as bits: -0.0 != 0.0
    return True


def _open_source(cfg: DataConfig, selection: dict[str, Any]) -> _Source:
    """The selection as a stream of row groups read from the dataset's own files (:mod:`.sources`): at most
    one row group of pixels is held, whatever the size of the selection.

    Float pixels that are all exact multiples of 1/255 are stored as uint8 (decided by one streaming pass);
    other float pixels as float32. Either way a stored row decodes bit for bit to what ``load_split`` gives.
    """
    raw = open_source(cfg)
    start, stop = select(cfg, len(raw), raw.where)
    dtype, scale = raw.dtype, raw.scale
    if dtype == "float32" and _uint8_exact(raw, start, stop):
        dtype, scale = "uint8", 255.0
    info = SampleSetInfo(
        dataset=raw.dataset,
        split=cfg.split,
        shape=raw.shape,
        dtype=dtype,
        scale=scale,
        num_classes=len(raw.class_names),
        class_names=raw.class_names,
        preprocessing=raw.preprocessing,
        selection=selection,
    )
    source = _Source(info=info, groups=None)

    def groups(rows_per_group: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        h = hashlib.sha256()  # Split.fingerprint(): ids, then labels, then the float images, streamed
        h.update(np.ascontiguousarray(raw.ids[start:stop], dtype=np.int64))
        h.update(np.ascontiguousarray(raw.labels[start:stop], dtype=np.int64))
        for g0 in range(start, stop, rows_per_group):
            g1 = min(stop, g0 + rows_per_group)
            pixels = raw.rows(g0, g1)
            step = max(1, _FLOAT_SLICE_BYTES // (4 * pixels[0].size)) if len(pixels) else 1
            for lo in range(0, len(pixels), step):  # bounded float copies (a 224 px row group is 154 MB of floats)
                h.update(to_float(pixels[lo : lo + step], raw.dtype, raw.scale))
            if dtype != raw.dtype:  # float source proven k/255 exact
                pixels = np.round(pixels * np.float32(255.0)).astype(np.uint8)
            yield raw.ids[g0:g1], raw.labels[g0:g1], pixels
        source.split_fingerprint = h.hexdigest()[:16]

    source.groups = groups
    return source
