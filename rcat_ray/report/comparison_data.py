"""What a comparison report is built from, read once through the store's checksums.

The comparison (summary, flips, manifest), both per-model tables (for predicted classes), the evaluated
sample set (clean images) and the stored adversarial images: every file verified against its manifest, a
damaged one moved to the quarantine and named in the error. Ray-free.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rcat_ray.config import DataConfig, parse_config
from rcat_ray.core.samples import INFO_FILE as SAMPLES_INFO_FILE
from rcat_ray.core.samples import SampleSet, open_samples, samples_location
from rcat_ray.errors import DamagedArtifactError, StoreError, UncheckedArtifactError
from rcat_ray.evaluate.plan import TABLE_MEMBERS, chunk_file_names, sample_ids
from rcat_ray.store.result_store import ResultStore, table_from_bytes

_TABLE_FILE = TABLE_MEMBERS[0]  # the per-model table inside tables/<key>/


@dataclass
class Context:
    """What the report is built from: the comparison's artifacts, read once, and the store for images."""

    store: ResultStore
    key: str
    summary: dict[str, Any]
    manifest: dict[str, Any]
    flips: pa.Table
    class_names: dict[int, str]
    # per-model predictions by sample id: (clean_pred, adv_pred or None); empty when unreadable
    preds_old: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    preds_new: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    split: SampleSet | None = None  # the evaluated samples: the store's sample set
    image_note: str | None = None  # why images are unavailable (None when they are)
    # each side's AutoAttack sanity record, from its table's manifest (None: stored before the checks existed)
    sanity: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # the comparison's flips re-checked by stronger attacks (compare --confirm), one record per attack
    confirmed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def confidence_label(self) -> str:
        conf = (self.summary.get("bootstrap") or {}).get("confidence", 0.95)
        return f"{float(conf) * 100:g}% CI"

    def class_name(self, cls: int | None) -> str:
        if cls is None:
            return "?"
        return self.class_names.get(int(cls), str(cls))

    def class_label(self, cls: int | None) -> str:
        """Index and name ("3: cat"), or just the index when the name is the index (digits)."""
        name = self.class_name(cls)
        return name if name == str(cls) else f"{cls}: {name}"


def load_context(store: ResultStore, key: str) -> Context:
    """Everything the report shows, read through the checksums the store's manifests record.

    A damaged comparison, per-model table or adversarial image file stops the report with one line naming the
    file, after it has been moved to the store's quarantine (as ``compare`` and ``evaluate`` do), so that
    comparing or evaluating again recomputes it. A report never renders numbers it could not verify.
    """
    from rcat_ray.evaluate.comparison import load_comparison

    # flips, summary and manifest checked against their checksums; the two tables are read below, where damage
    # to them stops the report instead of being set aside
    comparison = load_comparison(store, key, with_tables=False)
    summary, flips, manifest = comparison.summary, comparison.flips, comparison.manifest
    class_names = {int(row["class"]): str(row.get("name", row["class"])) for row in summary.get("per_class", [])}
    ctx = Context(store=store, key=key, summary=summary, manifest=manifest, flips=flips, class_names=class_names)

    old_manifest, old_table = _model_table(store, manifest, "old")
    new_manifest, new_table = _model_table(store, manifest, "new")
    ctx.sanity = {side: (m or {}).get("sanity") for side, m in (("old", old_manifest), ("new", new_manifest))}
    folder = f"comparisons/{key}"
    for sub in store.list_dirs(folder):
        if sub.startswith("confirm-") and store.exists(f"{folder}/{sub}/confirmed.json"):
            ctx.confirmed.append(store.read_json(f"{folder}/{sub}/confirmed.json"))
    ctx.preds_old = _predictions(old_table)
    ctx.preds_new = _predictions(new_table)
    ctx.split, ctx.image_note = _load_clean_images(store, old_manifest, manifest)
    if ctx.split is not None:
        # summaries made without class names only carry the indices; the dataset knows the real names
        for cls, name in enumerate(ctx.split.info.class_names):
            if ctx.class_names.get(cls, str(cls)) == str(cls):
                ctx.class_names[cls] = name
    return ctx


def _model_table(
    store: ResultStore, comparison_manifest: Mapping[str, Any], side: str
) -> tuple[dict[str, Any] | None, pa.Table | None]:
    """(manifest, table) of one side's per-model table, both verified; (None, None) when it is not stored.

    A table that is gone only costs the report its predictions and images (the comparison still names the
    model); a damaged one is moved aside and stops the report. A table written before checksums existed is
    read as it is, as :func:`rcat_ray.evaluate.comparison.load_comparison` reads a comparison of that age.
    """
    table_key = comparison_manifest.get(f"{side}_table")
    if not table_key:
        return None, None
    folder = f"tables/{table_key}"
    manifest = None
    try:
        manifest = store.read_manifest(f"{folder}/manifest.json")
        if manifest is None:
            return None, None
        table = table_from_bytes(store.read_verified(folder, _TABLE_FILE, manifest))
    except UncheckedArtifactError:
        legacy = store.read_json(f"{folder}/manifest.json")
        return legacy, store.read_table(f"{folder}/{_TABLE_FILE}")
    except DamagedArtifactError as err:
        store.quarantine_artifact(folder, "manifest.json", (_TABLE_FILE,), [(err.path, err.problem)], manifest)
        raise StoreError(f"{err}; moved aside: evaluate the model again to rebuild the table") from None
    named = (comparison_manifest.get(f"{side}_model") or {}).get("fingerprint")
    held = (manifest.get("model") or {}).get("fingerprint")
    if named and held and named != held:
        raise StoreError(
            f"{store.path(folder)} holds model {held}, but comparison {comparison_manifest.get('key')} names "
            f"{named} as its {side} model: the store is inconsistent, compare the two models again"
        )
    return manifest, table


def _predictions(table: pa.Table | None) -> dict[int, tuple[int, int | None]]:
    """Predicted classes by sample id, from a per-model table (the flip table only keeps flags)."""
    if table is None:
        return {}
    try:
        ids = table.column("sample_id").to_pylist()
        clean = table.column("clean_pred").to_pylist()
        adv = table.column("adv_pred").to_pylist()
    except KeyError:
        return {}
    return {int(i): (int(c), None if a is None else int(a)) for i, c, a in zip(ids, clean, adv, strict=True)}


def _load_clean_images(
    store: ResultStore, table_manifest: Mapping[str, Any] | None, manifest: Mapping[str, Any]
) -> tuple[SampleSet | None, str | None]:
    """The evaluated samples, or why they cannot be shown (the report then renders without images).

    Images come from the selection's sample set in the store, which the evaluation prepared, and from
    nothing else: the report reads only the rows of the images it shows (:func:`clean_images`), each row
    group checked against its sha256 (a damaged set stops the report, naming the file), and never decodes
    the dataset's files in the driver. The set must have the fingerprint the table records, or it does not
    hold the images that were evaluated and none are shown.
    """
    evaluated = (table_manifest or {}).get("data") or {}
    settings = (table_manifest or {}).get("settings") or {}
    if settings.get("data") is None:
        return None, "the old model's table does not record its data selection, so its sample set cannot be found"
    try:
        cfg = parse_config(DataConfig, settings["data"])
        location = _stored_samples_location(store, cfg)
    except (StoreError, ValueError, KeyError, TypeError, OSError) as err:
        return None, f"the clean images could not be loaded ({_first_line(err)})"
    if location is None:
        return None, (
            f"the store holds no sample set of the evaluated {cfg.name} selection (it is read from there only); "
            "`rcat-ray data prepare` with the table's data config and this store puts it there"
        )
    samples = open_samples(location)  # damaged set: DataError naming the file, stops here
    expected = evaluated.get("fingerprint")
    got = samples.describe()["fingerprint"]
    if expected and got != expected:
        return None, (
            f"{location} are not the samples that were evaluated (fingerprint {got}, the table records {expected})"
        )
    return samples, None


def _stored_samples_location(store: ResultStore, cfg: DataConfig) -> str | None:
    """Where the store keeps the selection's prepared sample set, None when it keeps none."""
    base = (store.uri if "://" in store.uri else store.root).rstrip("/")
    location = samples_location(base, cfg)
    rel = location[len(base) + 1 :]
    return location if store.exists(f"{rel}/{SAMPLES_INFO_FILE}") else None


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def clean_images(samples: SampleSet, ids: Sequence[int]) -> dict[int, np.ndarray]:
    """Clean images of some sample ids (absent ones skipped): only the row groups holding them are read (the
    set's id column locates them)."""
    all_ids = sample_ids(samples)
    wanted = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)
    if not len(all_ids) or not len(wanted):
        return {}
    pos = np.minimum(np.searchsorted(all_ids, wanted), len(all_ids) - 1)  # ids are strictly increasing
    found = all_ids[pos] == wanted
    wanted, pos = wanted[found], pos[found]
    out: dict[int, np.ndarray] = {}
    if len(pos):
        images, _, got = next(samples.iter_batches(len(pos), positions=pos))
        out = {int(sid): img.numpy() for sid, img in zip(got.tolist(), images, strict=True)}
    return out


@dataclass
class Flip:
    """One flipped sample with what the captions need."""

    sample_id: int
    label: int
    score: float
    old_clean_correct: bool
    new_clean_correct: bool
    old_robust: bool | None
    new_robust: bool | None
    old_clean_margin: float
    new_clean_margin: float
    old_adv_margin: float | None
    new_adv_margin: float | None

    @classmethod
    def from_row(cls, r: dict[str, Any], score: float) -> Flip:
        """A flip table's row (``to_pylist``) with the score it was ranked by."""
        return cls(
            sample_id=int(r["sample_id"]),
            label=int(r["label"]),
            score=float(score),
            old_clean_correct=bool(r["old_clean_correct"]),
            new_clean_correct=bool(r["new_clean_correct"]),
            old_robust=r.get("old_robust"),
            new_robust=r.get("new_robust"),
            old_clean_margin=float(r["old_clean_margin"]),
            new_clean_margin=float(r["new_clean_margin"]),
            old_adv_margin=r.get("old_adv_margin"),
            new_adv_margin=r.get("new_adv_margin"),
        )


def worst_flips(flips: pa.Table, *, robust: bool, top_k: int) -> tuple[list[Flip], int]:
    """The top_k negative flips by margin drop (largest first, ties by sample id), and how many there are."""
    flag, old_m, new_m = (
        ("robust_neg_flip", "old_adv_margin", "new_adv_margin")
        if robust
        else ("neg_flip", "old_clean_margin", "new_clean_margin")
    )
    if flag not in flips.column_names:
        return [], 0
    sel = flips.filter(pc.fill_null(flips.column(flag), False))
    total = sel.num_rows
    if total == 0 or top_k == 0:
        return [], total
    score = pc.subtract(pc.cast(sel.column(old_m), pa.float64()), pc.cast(sel.column(new_m), pa.float64()))
    sel = sel.append_column("_score", pc.fill_null(score, -math.inf))
    sel = sel.sort_by([("_score", "descending"), ("sample_id", "ascending")]).slice(0, top_k)
    return [Flip.from_row(r, r["_score"]) for r in sel.to_pylist()], total


def point_status(clean_correct: bool, robust: bool | None) -> str:
    """What the stored adversarial point of one model is for one sample.

    A model that withstood the attack (or was wrong already on the clean image, so was never attacked)
    keeps the clean image as its stored point; that must be said, or the panel looks like a failed attack.
    """
    if robust is None:
        return "not attacked"
    if not clean_correct:
        return "wrong on clean, not attacked"
    return "withstood" if robust else "broken"


def adversarial_images(ctx: Context, table_key: str | None, ids: list[int]) -> dict[int, np.ndarray]:
    """Adversarial images of some samples, each file read through the checksum in its chunk's manifest; absent
    ones are skipped (the panels then say so).

    A damaged file stops the report, naming it, once it is moved aside: a report with silently missing panels
    would look like a model that withstood the attack.
    """
    if not table_key:
        return {}
    store = ctx.store
    wanted = {int(i) for i in ids}
    out: dict[int, np.ndarray] = {}
    folder = f"tables/{table_key}/chunks"
    for name in store.list_files(folder):
        if not wanted - out.keys():
            break
        if not (name.startswith("adv-") and name.endswith(".npz") and name[4:-4].isdigit()):
            continue
        manifest_name, *members = chunk_file_names(int(name[4:-4]))
        manifest = None
        try:
            manifest = store.read_manifest(f"{folder}/{manifest_name}")
            if manifest is None:
                continue  # an unfinished chunk: its images are not trusted
            data = store.read_verified(folder, name, manifest)
        except DamagedArtifactError as err:
            store.quarantine_artifact(folder, manifest_name, members, [(err.path, err.problem)], manifest)
            raise StoreError(f"{err}; moved aside: evaluate the model again to recompute its chunk") from None
        with np.load(io.BytesIO(data)) as z:
            chunk_ids = z["sample_id"]
            hits = np.nonzero(np.isin(chunk_ids, list(wanted)))[0]
            if len(hits):
                images = z["images"]
                for h in hits:
                    out[int(chunk_ids[h])] = images[h]
    return out
