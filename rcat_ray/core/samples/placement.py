"""Where a result store keeps the sample set of a selection, and how a damaged one is moved aside.

``<store>/samples/<dataset>-<split>-<hash of the selection>``: the result store is the one place every node
of a cluster already reaches. A set found damaged is moved to the store's quarantine (never deleted) and
prepared again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.fs as pafs

from rcat_ray.config import DataConfig
from rcat_ray.core.samples.format import _join, _read_info, _renames_folders, _resolve
from rcat_ray.core.samples.read import SampleSet, open_samples
from rcat_ray.core.samples.source import _selection
from rcat_ray.core.samples.write import prepare_samples
from rcat_ray.errors import DamagedSetError, DataError, NotASetError

log = logging.getLogger(__name__)

#: The result store's folder for damaged artifacts (``store.result_store.QUARANTINE_DIR``: the core does not
#: import the store, which sits above it).
QUARANTINE_FOLDER = "quarantine"

#: Folder of a result store that holds the prepared sample sets its evaluations and fine-tunes read.
SAMPLES_FOLDER = "samples"


def samples_location(store_uri: str, cfg: DataConfig) -> str:
    """Where a store keeps the set of a selection: ``<store>/samples/<hash of the selection>``.

    The result store is the one place every node of a cluster already reaches (shared storage or object
    storage), so a set prepared there by the driver is readable by every worker.
    """
    key = hashlib.sha256(json.dumps(_selection(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return f"{str(store_uri).rstrip('/')}/{SAMPLES_FOLDER}/{cfg.name}-{cfg.split}-{key}"


def samples_in_store(store_uri: str, cfg: DataConfig, *, rows_per_group: int = 256) -> SampleSet:
    """The selection's sample set in a result store, prepared on first use and reused after (no rewrite).

    A set found damaged by the cheap check (dataset.json unreadable or gone, a part missing or of the wrong
    size) is moved to the store's quarantine with a warning and prepared again, as a damaged table is rebuilt:
    every folder under ``samples/`` is the store's own, so moving one aside loses nothing. Damage inside a part
    (altered bytes of the right size) is found when the rows are read (each row group is hashed) and stops
    that run naming the file; ``rcat-ray store verify --repair`` then moves the set aside.
    """
    location = samples_location(store_uri, cfg)
    try:
        prepare_samples(cfg, location, rows_per_group=rows_per_group)
        return open_samples(location)
    except (DamagedSetError, NotASetError) as err:
        fs, store_root = _resolve(store_uri, None)
        rel = f"{SAMPLES_FOLDER}/{location.rsplit('/', 1)[1]}"
        root = _join(store_root, rel)
        if not _still_damaged(fs, root, location):
            if fs.get_file_info(root).type == pafs.FileType.NotFound:
                raise  # nothing stored is damaged: what this run was writing failed, say so
            return open_samples(location)  # another run repaired it meanwhile
        set_aside(fs, store_root, rel, f"damaged sample set: {err}")
    prepare_samples(cfg, location, rows_per_group=rows_per_group)
    return open_samples(location)


def _still_damaged(fs: pafs.FileSystem, root: str, uri: str) -> bool:
    """Checked again right before moving a set aside, so a run that finds damage another run has already
    repaired (moved aside and prepared again) does not move the fresh set."""
    try:
        info = _read_info(fs, root, uri)
        if info is not None:
            SampleSet(info, fs, root, uri).check_files()
            return False
    except DataError:
        return True
    # no dataset.json: damage on a local disk (a set appears there whole, by a rename); on an object store,
    # where parts come first, possibly another preparer at work, whose files must not move
    return _renames_folders(fs) and bool(fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)))


def set_aside(fs: pafs.FileSystem, store_root: str, rel: str, reason: str) -> str | None:
    """Move a folder of a result store (a damaged sample set) to ``quarantine/<UTC time>/<rel>`` with a warning;
    returns where it went (store-relative), None when it is gone already (another process moved it).

    Moved, never deleted, like a damaged table: it can still be inspected, and a false alarm loses nothing.
    Object stores have no folder rename, so there the files move one by one.
    """
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    dest_rel = f"{QUARANTINE_FOLDER}/{stamp}/{rel}"
    src, dest = _join(store_root, rel), _join(store_root, dest_rel)
    try:
        if _renames_folders(fs):
            fs.create_dir(dest.rpartition("/")[0], recursive=True)
            fs.move(src, dest)
        else:
            files = fs.get_file_info(pafs.FileSelector(src, recursive=True))
            for fi in (f for f in files if f.type == pafs.FileType.File):
                target = _join(dest, fi.path[len(src) :].lstrip("/"))
                fs.create_dir(target.rpartition("/")[0], recursive=True)
                fs.move(fi.path, target)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot move the damaged sample set {src} aside: {err}") from None
    log.warning("%s. Moved to %s", reason, dest)
    return dest_rel
