"""The HTML report of one stored comparison: header, summary table, per-class flips, worst flipped samples.

A report is read by people deciding whether a model update may ship, so it shows the numbers with their
uncertainty (every rate with its confidence interval and its own N) and the evidence behind them (the
samples the update broke, with the adversarial images of both models). It is built only from what the
result store holds, so it can be regenerated at any time, on any machine that can read the store.

Plots use matplotlib's Agg canvas directly (no pyplot): no global backend switch, no GUI, and safe to call
from a worker thread. Files are written under temporary names and renamed, with ``report.html`` renamed
last, so a reader never sees a half-written report or a report pointing at a missing plot.
"""

from __future__ import annotations

import html
import io
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rcat_ray.config import DataConfig, parse_config
from rcat_ray.core.flips import METRIC_LABELS, METRICS
from rcat_ray.core.samples import INFO_FILE as SAMPLES_INFO_FILE
from rcat_ray.core.samples import SampleSet, open_samples, samples_location
from rcat_ray.errors import DamagedArtifactError, StoreError, UncheckedArtifactError
from rcat_ray.evaluate.plan import TABLE_MEMBERS, chunk_file_names, sample_ids
from rcat_ray.store.result_store import ResultStore, now_iso, table_from_bytes

__all__ = ["REPORT_NAME", "write_report"]

#: File name of the report inside ``out_dir``.
REPORT_NAME = "report.html"
_TABLE_FILE = TABLE_MEMBERS[0]  # the per-model table inside tables/<key>/
PER_CLASS_PNG = "per_class_flips.png"
ROBUST_GRID_PNG = "worst_robust_flips.png"
CLEAN_GRID_PNG = "worst_clean_flips.png"
#: Every file name this module may write; a new report removes those it did not produce this time.
_ARTIFACTS = (PER_CLASS_PNG, ROBUST_GRID_PNG, CLEAN_GRID_PNG)

#: One-line definitions shown next to each metric, so the table can be read without the paper.
_DEFINITIONS: Mapping[str, str] = {
    "acc_old": "clean accuracy of the old model",
    "acc": "clean accuracy of the new model",
    "nfr": "old correct, new wrong (clean)",
    "pfr": "old wrong, new correct (clean)",
    "relative_nfr": "NFR / ((1 - err_old) * err_new)",
    "rob_acc_old": "robust accuracy of the old model",
    "rob_acc": "robust accuracy of the new model",
    "r_nfr": "old robust, new not",
    "r_pfr": "old not robust, new robust",
    "b_nfr": "both a clean and a robust negative flip",
    "s_nfr": "a clean or a robust negative flip (NFR + R-NFR - B-NFR)",
}

# Colours of the per-class plot: negative flips saturated, positive flips a lighter tint of the same hue.
_BAR_STYLE: tuple[tuple[str, str, float], ...] = (
    ("nfr", "#c0392b", 1.0),
    ("r_nfr", "#1f4e9c", 1.0),
    ("pfr", "#c0392b", 0.35),
    ("r_pfr", "#1f4e9c", 0.35),
)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def write_report(store: ResultStore, comparison_key: str, out_dir: str | Path, *, top_k: int = 8) -> Path:
    """Write ``<out_dir>/report.html`` plus PNG plots next to it; returns the HTML path.

    Why atomic: reports are often served straight from a shared folder while a nightly job rewrites them,
    so every file is written under a temporary name and renamed into place, plots first and the HTML
    last. A failure part-way leaves the previous report intact and no temporary files behind.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ctx = _load_context(store, comparison_key)

    writer = _AtomicWriter(out)
    try:
        sections: list[str] = [_header_html(ctx), _summary_html(ctx)]
        sections.append(_per_class_html(ctx, writer))
        sections.append(_worst_flips_html(ctx, writer, robust=True, top_k=top_k))
        sections.append(_worst_flips_html(ctx, writer, robust=False, top_k=top_k))
        writer.stage_text(REPORT_NAME, _page(ctx, sections))
        writer.commit(last=REPORT_NAME)
    finally:
        writer.discard()
    for stale in set(_ARTIFACTS) - writer.committed:
        (out / stale).unlink(missing_ok=True)
    return out / REPORT_NAME


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass
class _Context:
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


def _load_context(store: ResultStore, key: str) -> _Context:
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
    ctx = _Context(store=store, key=key, summary=summary, manifest=manifest, flips=flips, class_names=class_names)

    old_manifest, old_table = _model_table(store, manifest, "old")
    _, new_table = _model_table(store, manifest, "new")
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
    nothing else: the report reads only the rows of the images it shows (:func:`_clean_images`), each row
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


def _clean_images(samples: SampleSet, ids: Sequence[int]) -> dict[int, np.ndarray]:
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


# --------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pct(x: Any, digits: int = 2) -> str:
    f = _finite(x)
    return "n/a" if f is None else f"{f * 100:.{digits}f}%"


def _ci(metric: Mapping[str, Any], digits: int = 2) -> str:
    lo, hi = _finite(metric.get("ci_low")), _finite(metric.get("ci_high"))
    if lo is None or hi is None:
        return "n/a"
    return f"[{lo * 100:.{digits}f}, {hi * 100:.{digits}f}]"


def _metric_keys(metrics: Mapping[str, Any]) -> list[str]:
    """Known metrics in display order, then any newer ones the summary carries."""
    return [k for k in METRICS if k in metrics] + sorted(k for k in metrics if k not in METRICS)


def _label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric_from: int = 1) -> str:
    """An HTML table from already-escaped cells; columns from ``numeric_from`` on are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def _model_line(info: Mapping[str, Any] | None, fallback: Mapping[str, Any] | None) -> tuple[str, str]:
    info = info or fallback or {}
    return str(info.get("name", "?")), str(info.get("fingerprint", "?"))


def _header_html(ctx: _Context) -> str:
    s, m = ctx.summary, ctx.manifest
    old_name, old_fp = _model_line(s.get("old"), m.get("old_model"))
    new_name, new_fp = _model_line(s.get("new"), m.get("new_model"))
    data = m.get("data") or {}
    dataset = f"{data.get('dataset', '?')} / {data.get('split', '?')}"
    if data.get("n_samples") is not None:
        dataset += f" ({data['n_samples']} samples, ids {data.get('sample_id_min')}..{data.get('sample_id_max')})"
    tm = s.get("threat_model") or {}
    eps = _finite(tm.get("eps"))
    eps_text = "?" if eps is None else f"{eps:g}" + (f" (= {eps * 255:.3g}/255)" if tm.get("norm") == "Linf" else "")
    boot = s.get("bootstrap") or {}
    rows = [
        ("Old model", f"{_e(old_name)} <code>{_e(old_fp)}</code>"),
        ("New model", f"{_e(new_name)} <code>{_e(new_fp)}</code>"),
        ("Dataset", _e(dataset)),
        ("Threat model", f"{_e(tm.get('norm', '?'))}, eps {_e(eps_text)}"),
        ("Attacks", _e(" → ".join(str(a) for a in s.get("attacks") or []) or "?")),
        ("N clean / N robust", f"{_e(s.get('n_clean', '?'))} / {_e(s.get('n_robust', '?'))}"),
        (
            "Bootstrap",
            _e(f"{boot.get('n_resamples', '?')} paired resamples, seed {boot.get('seed', '?')}"),
        ),
        ("Comparison", f"<code>{_e(ctx.key)}</code> created {_e(m.get('created_at', '?'))}"),
        ("Report written", _e(now_iso())),
    ]
    items = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    title = f"{_e(old_name)} → {_e(new_name)}"
    return f'<h1>Model update report: {title}</h1>\n<table class="meta">{items}</table>'


def _summary_html(ctx: _Context) -> str:
    metrics = ctx.summary.get("metrics") or {}
    rows = []
    for key in _metric_keys(metrics):
        m = metrics[key] or {}
        rows.append(
            (
                f"<b>{_e(_label(key))}</b>",
                _e(_DEFINITIONS.get(key, "")),
                _e(_pct(m.get("value"))),
                _e(_ci(m)),
                _e(m.get("n", "?")),
            )
        )
    table = _table(("Metric", "Definition", "Value", ctx.confidence_label, "N"), rows, numeric_from=2)
    note = (
        '<p class="note">Rates are over each metric\'s own N (robust metrics use the samples attacked for '
        "both models); intervals are paired bootstrap percentiles over samples.</p>"
    )
    return f"<h2>Summary</h2>\n{table}\n{note}"


def _per_class_html(ctx: _Context, writer: _AtomicWriter) -> str:
    per_class = ctx.summary.get("per_class") or []
    if not per_class:
        return '<h2>Per class</h2>\n<p class="note">The summary has no per-class breakdown.</p>'
    writer.stage_png(PER_CLASS_PNG, _per_class_figure(ctx, per_class))
    keys = ("acc", "nfr", "pfr", "rob_acc", "r_nfr", "r_pfr", "s_nfr")
    headers = ["Class", "N clean", "N robust", *(_e(_label(k)) for k in keys)]
    rows = []
    for row in per_class:
        mets = row.get("metrics") or {}
        cells = [_e(ctx.class_label(row.get("class"))), _e(row.get("n_clean", "?")),
                 _e(row.get("n_robust", "?"))]  # fmt: skip
        for k in keys:
            m = mets.get(k) or {}
            cells.append(f"{_e(_pct(m.get('value'), 1))}<br><small>{_e(_ci(m, 1))}</small>")
        rows.append(cells)
    img = (
        f'<img src="{_e(PER_CLASS_PNG)}" alt="per-class negative and positive flip rates with '
        f'{_e(ctx.confidence_label)}">'
    )
    return f"<h2>Per class</h2>\n{img}\n{_table(headers, rows)}"


def _per_class_figure(ctx: _Context, per_class: Sequence[Mapping[str, Any]]) -> Figure:
    """Grouped bars per class: NFR and R-NFR saturated, PFR and R-PFR lighter, with CI error bars."""
    n = len(per_class)
    names = [ctx.class_name(row.get("class")) for row in per_class]
    fig = Figure(figsize=(max(6.0, 0.9 * n + 2.0), 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(_BAR_STYLE)
    x = np.arange(n)
    for j, (key, colour, alpha) in enumerate(_BAR_STYLE):
        vals, lo_err, hi_err = [], [], []
        for row in per_class:
            m = (row.get("metrics") or {}).get(key) or {}
            v, lo, hi = _finite(m.get("value")), _finite(m.get("ci_low")), _finite(m.get("ci_high"))
            vals.append(np.nan if v is None else v * 100)
            lo_err.append(0.0 if v is None or lo is None else max(0.0, (v - lo) * 100))
            hi_err.append(0.0 if v is None or hi is None else max(0.0, (hi - v) * 100))
        ax.bar(
            x + (j - (len(_BAR_STYLE) - 1) / 2) * width, vals, width, color=colour, alpha=alpha,
            label=_label(key), yerr=[lo_err, hi_err], capsize=2,
            error_kw={"elinewidth": 0.8, "ecolor": "#333333", "alpha": 0.8},
        )  # fmt: skip
    ax.set_xticks(x)
    long_names = max((len(s) for s in names), default=0) > 4
    ax.set_xticklabels(names, rotation=30 if long_names else 0, ha="right" if long_names else "center")
    ax.set_ylabel("rate (% of the class's samples)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Flip rates per class ({ctx.confidence_label} error bars)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(ncols=4, fontsize=8, loc="upper left")
    return fig


# --------------------------------------------------------------------------------------------------
# Worst flipped samples
# --------------------------------------------------------------------------------------------------


@dataclass
class _Flip:
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


def _worst(flips: pa.Table, *, robust: bool, top_k: int) -> tuple[list[_Flip], int]:
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
    out = []
    for r in sel.to_pylist():
        out.append(
            _Flip(
                sample_id=int(r["sample_id"]), label=int(r["label"]), score=float(r["_score"]),
                old_clean_correct=bool(r["old_clean_correct"]), new_clean_correct=bool(r["new_clean_correct"]),
                old_robust=r.get("old_robust"), new_robust=r.get("new_robust"),
                old_clean_margin=float(r["old_clean_margin"]), new_clean_margin=float(r["new_clean_margin"]),
                old_adv_margin=r.get("old_adv_margin"), new_adv_margin=r.get("new_adv_margin"),
            )
        )  # fmt: skip
    return out, total


def _status(clean_correct: bool, robust: bool | None) -> str:
    """What the stored adversarial point of one model is for one sample.

    A model that withstood the attack (or was wrong already on the clean image, so was never attacked)
    keeps the clean image as its stored point; that must be said, or the panel looks like a failed attack.
    """
    if robust is None:
        return "not attacked"
    if not clean_correct:
        return "wrong on clean, not attacked"
    return "withstood" if robust else "broken"


def _fmt_margin(x: float | None) -> str:
    f = _finite(x)
    return "n/a" if f is None else f"{f:+.2f}"


def _worst_flips_html(ctx: _Context, writer: _AtomicWriter, *, robust: bool, top_k: int) -> str:
    kind = "robust" if robust else "clean"
    title = (
        "Worst robust negative flips (old robust, new not)"
        if robust
        else "Worst clean negative flips (old correct, new wrong)"
    )
    rank_by = "old adv margin − new adv margin" if robust else "old clean margin − new clean margin"
    head = f"<h2>{_e(title)}</h2>"
    if robust and not ctx.summary.get("n_robust"):
        return f'{head}\n<p class="note">No sample was attacked for both models: robust flips are not available.</p>'
    chosen, total = _worst(ctx.flips, robust=robust, top_k=top_k)
    if total == 0:
        return f'{head}\n<p class="note">None: the update introduced no {kind} negative flips on these samples.</p>'
    intro = (
        f"<p>{total} {kind} negative flip{'s' if total != 1 else ''}; showing the {len(chosen)} with the "
        f"largest drop of the true-class margin ({_e(rank_by)}). The margin is the true-class logit minus the "
        "best other logit: positive means correctly classified.</p>"
    )
    rows = []
    for rank, f in enumerate(chosen, 1):
        oc, oa = ctx.preds_old.get(f.sample_id, (None, None))
        nc, na = ctx.preds_new.get(f.sample_id, (None, None))
        rows.append(
            (
                _e(rank), _e(f.sample_id), _e(ctx.class_label(f.label)),
                _e(ctx.class_name(oc) if oc is not None else "?"), _e(ctx.class_name(nc) if nc is not None else "?"),
                _e(_adv_pred_text(ctx, oa, f.old_clean_correct, f.old_robust)),
                _e(_adv_pred_text(ctx, na, f.new_clean_correct, f.new_robust)),
                _e(f"{_fmt_margin(f.old_clean_margin)} / {_fmt_margin(f.new_clean_margin)}"),
                _e(f"{_fmt_margin(f.old_adv_margin)} / {_fmt_margin(f.new_adv_margin)}"),
                _e(f"{f.score:.2f}" if math.isfinite(f.score) else "n/a"),
            )
        )  # fmt: skip
    table = _table(
        ("#", "Sample", "Label", "Old pred", "New pred", "Old adv pred", "New adv pred",
         "Clean margin old / new", "Adv margin old / new", "Drop"),
        rows, numeric_from=7,
    )  # fmt: skip
    if ctx.split is None:
        grid = f'<p class="note">Images are not shown: {_e(ctx.image_note or "no image data")}.</p>'
    else:
        name = ROBUST_GRID_PNG if robust else CLEAN_GRID_PNG
        writer.stage_png(name, _flip_grid(ctx, chosen, robust=robust))
        grid = f'<img src="{_e(name)}" alt="{_e(title)}: clean, old adversarial, new adversarial, perturbation">'
    return f"{head}\n{intro}\n{grid}\n{table}"


def _adv_pred_text(ctx: _Context, pred: int | None, clean_correct: bool, robust: bool | None) -> str:
    status = _status(clean_correct, robust)
    if status in ("not attacked", "wrong on clean, not attacked"):
        return status
    name = ctx.class_name(pred) if pred is not None else "?"
    return f"{name} ({status})"


def _flip_grid(ctx: _Context, chosen: Sequence[_Flip], *, robust: bool) -> Figure:
    """One row per flipped sample: clean, old adversarial, new adversarial, amplified |new adv - clean|."""
    assert ctx.split is not None
    ids = [f.sample_id for f in chosen]
    old_key, new_key = ctx.manifest.get("old_table"), ctx.manifest.get("new_table")
    adv_old = _adversarial(ctx, old_key, ids)
    adv_new = _adversarial(ctx, new_key, ids)

    tm = ctx.summary.get("threat_model") or {}
    eps = _finite(tm.get("eps"))
    clean_imgs = _clean_images(ctx.split, ids)
    deltas: dict[int, np.ndarray] = {}
    for f in chosen:
        if f.sample_id in clean_imgs and f.sample_id in adv_new:
            deltas[f.sample_id] = np.abs(adv_new[f.sample_id] - clean_imgs[f.sample_id])
    # Linf: full brightness is the budget eps, so panels compare across samples; L2 spreads the budget
    # thinly over pixels, so scale to the largest shown change instead.
    if tm.get("norm") == "Linf" and eps:
        gain = 1.0 / eps
    else:
        peak = max((float(d.max()) for d in deltas.values()), default=0.0)
        gain = 1.0 / peak if peak > 0 else 1.0

    cols = 4
    fig = Figure(figsize=(cols * 2.3, max(1, len(chosen)) * 2.55 + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(chosen)), cols, squeeze=False)
    for row, f in enumerate(chosen):
        oc, oa = ctx.preds_old.get(f.sample_id, (None, None))
        nc, na = ctx.preds_new.get(f.sample_id, (None, None))
        clean = clean_imgs.get(f.sample_id)
        old_status = _status(f.old_clean_correct, f.old_robust)
        new_status = _status(f.new_clean_correct, f.new_robust)
        panels = [
            (
                clean,
                f"#{f.sample_id}  label {ctx.class_name(f.label)}\n"
                f"clean: old→{_name(ctx, oc)} ({_fmt_margin(f.old_clean_margin)})\n"
                f"new→{_name(ctx, nc)} ({_fmt_margin(f.new_clean_margin)})",
            ),
            (
                _stored_point(adv_old.get(f.sample_id), clean, old_status),
                _adv_caption("old", ctx, oa, old_status, f.old_adv_margin),
            ),
            (
                _stored_point(adv_new.get(f.sample_id), clean, new_status),
                _adv_caption("new", ctx, na, new_status, f.new_adv_margin),
            ),
            (
                None if f.sample_id not in deltas else np.clip(deltas[f.sample_id] * gain, 0.0, 1.0),
                f"|new adv − clean| ×{gain:.3g}\n" + _delta_caption(deltas.get(f.sample_id), new_status),
            ),
        ]
        for col, (img, caption) in enumerate(panels):
            _show(axes[row][col], img, caption)
    kind = "Robust" if robust else "Clean"
    fig.suptitle(f"{kind} negative flips: clean | old adversarial | new adversarial | perturbation", fontsize=10)
    return fig


def _delta_caption(delta: np.ndarray | None, new_status: str) -> str:
    """Say why a perturbation panel is empty, so a black square is not read as a failed attack."""
    if delta is None:
        return "not available"
    if new_status != "broken":
        return f"none (new model:\n{new_status})"
    return f"max {float(delta.max()):.3g}"


def _adversarial(ctx: _Context, table_key: str | None, ids: list[int]) -> dict[int, np.ndarray]:
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


def _stored_point(adv: np.ndarray | None, clean: np.ndarray | None, status: str) -> np.ndarray | None:
    """The image the model was judged on: its adversarial example, or the clean image it kept."""
    if adv is not None:
        return adv
    if status in ("withstood", "wrong on clean, not attacked"):
        return clean
    return None


def _name(ctx: _Context, pred: int | None) -> str:
    return "?" if pred is None else ctx.class_name(pred)


def _adv_caption(which: str, ctx: _Context, pred: int | None, status: str, margin: float | None) -> str:
    if status == "not attacked":
        return f"{which} model: not attacked"
    if status == "wrong on clean, not attacked":
        return f"{which} model: wrong on clean\n(clean image, not attacked)"
    return f"{which} adv: {status}\n→{_name(ctx, pred)} (margin {_fmt_margin(margin)})"


def _show(ax: Any, img: np.ndarray | None, caption: str) -> None:
    """Grey images (C=1) with a grey colour map, RGB as RGB, on a fixed [0, 1] range so panels compare."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption, fontsize=7, loc="left")
    if img is None:
        ax.text(0.5, 0.5, "image not stored", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_facecolor("#eeeeee")
        return
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3:
        ax.imshow(np.clip(arr.transpose(1, 2, 0), 0.0, 1.0), interpolation="nearest")
    else:
        grey = arr[0] if arr.ndim == 3 else arr
        ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")


# --------------------------------------------------------------------------------------------------
# Page and atomic writing
# --------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; vertical-align: top; }
thead th { background: #f3f3f3; } table.meta th { text-align: left; background: #f8f8f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-size: 0.9em; } small { color: #666; } .note { color: #666; font-style: italic; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
"""


def _page(ctx: _Context, sections: Sequence[str]) -> str:
    old = (ctx.summary.get("old") or {}).get("name", "old")
    new = (ctx.summary.get("new") or {}).get("name", "new")
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>rcat_ray report: {_e(old)} → {_e(new)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


class _AtomicWriter:
    """Stage files under hidden temporary names in the target folder, then rename them into place.

    Renaming within one folder is atomic on POSIX and Windows (``os.replace``), so readers see either the
    old file or the new one. Temporary files live in the same folder so the rename never crosses devices.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.staged: dict[str, Path] = {}
        self.committed: set[str] = set()

    def _tmp(self, name: str) -> Path:
        return self.folder / f".{name}.tmp-{uuid.uuid4().hex}"

    def stage_text(self, name: str, text: str) -> None:
        tmp = self._tmp(name)
        self.staged[name] = tmp
        tmp.write_text(text, encoding="utf-8")

    def stage_png(self, name: str, fig: Figure) -> None:
        tmp = self._tmp(name)
        self.staged[name] = tmp
        fig.savefig(tmp, format="png")

    def commit(self, *, last: str) -> None:
        for name in sorted(self.staged, key=lambda n: n == last):
            os.replace(self.staged[name], self.folder / name)
            self.committed.add(name)
        self.staged.clear()

    def discard(self) -> None:
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged.clear()
