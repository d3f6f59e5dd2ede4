"""Tests of rcat_ray.report.flip_report on a small real store (digits, two trained MLPs, real attacks), without Ray."""

from __future__ import annotations

import html
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from rcat_ray.config import AttackConfig, BootstrapConfig, DataConfig, EvaluationSettings, ModelConfig
from rcat_ray.core.data import Split, load_split
from rcat_ray.core.flips import METRIC_LABELS
from rcat_ray.core.models import LoadedModel, from_module, load_model
from rcat_ray.core.samples import samples_in_store, samples_location
from rcat_ray.evaluate.comparison import Comparison, compare_stored
from rcat_ray.evaluate.plan import EvaluationPlan, assemble, run_chunk
from rcat_ray.report import flip_report as report
from rcat_ray.report.flip_report import CLEAN_GRID_PNG, PER_CLASS_PNG, REPORT_NAME, ROBUST_GRID_PNG, write_report
from rcat_ray.report.near_flips import MARGINS_PNG, NEAR_GRID_PNG, nearest_near_flips
from rcat_ray.store.result_store import ResultStore
from tests.conftest import fit

OLD_LABEL = "old <b>mlp</b>"
NEW_LABEL = "new mlp & co"
DATA = DataConfig(name="digits", split="test", limit=40)
ATTACK = AttackConfig(eps=0.1, n_iter=5)


def _trained(seed: int, steps: int, label: str, train: Split) -> LoadedModel:
    """A builtin MLP after a few Adam steps; re-wrapped so its fingerprint matches the trained weights."""
    loaded = load_model(
        ModelConfig(source="builtin", name="mlp", seed=seed, label=label),
        num_classes=10,
        input_shape=train.input_shape,
    )
    with torch.random.fork_rng():
        module = fit(loaded.module, train, steps, seed)
    return from_module(module, name=loaded.name, num_classes=10, source=loaded.source)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResultStore, Comparison]:
    """A store holding two per-model tables (with adversarial images) and their comparison.

    One torch thread: these tensors are tiny, and on a shared 2-CPU machine intra-op threads fighting other
    processes made the same work 30x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_store(tmp_path_factory.mktemp("store"))
    finally:
        torch.set_num_threads(threads)


def _build_store(root: Path) -> tuple[ResultStore, Comparison]:
    store = ResultStore(root)
    train = load_split(DataConfig(name="digits", split="train"))
    split = load_split(DATA)
    settings = EvaluationSettings(data=DATA, attack=ATTACK, chunk_size=20, store=str(root))
    keys = []
    for model in (_trained(0, 15, OLD_LABEL, train), _trained(1, 80, NEW_LABEL, train)):
        plan = EvaluationPlan(model, split, ATTACK, chunk_size=20)
        for chunk in plan.chunks():
            run_chunk(plan, chunk, store, device=torch.device("cpu"), keep_adversarial=True)
        assemble(plan, store, settings)
        keys.append(plan.key)
    samples_in_store(str(root), DATA, rows_per_group=20)  # the set evaluate prepares: the report's only image source
    comparison = compare_stored(store, keys[0], keys[1], BootstrapConfig(n_resamples=100))
    return store, comparison


def _n_robust_flips(comparison: Comparison) -> int:
    return int(pc.sum(pc.fill_null(comparison.flips.column("robust_neg_flip"), False)).as_py() or 0)


def test_report_contents(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    store, comparison = stored
    path = write_report(store, comparison.key, tmp_path / "rep", top_k=4)
    assert path == tmp_path / "rep" / REPORT_NAME
    text = path.read_text(encoding="utf-8")

    # names are escaped, never injected as markup
    assert html.escape(OLD_LABEL) in text
    assert html.escape(NEW_LABEL) in text
    assert "<b>mlp</b>" not in text
    assert comparison.summary["old"]["fingerprint"] in text
    assert comparison.summary["new"]["fingerprint"] in text
    assert "digits" in text and "Linf" in text and "apgd-ce" in text
    for label in METRIC_LABELS.values():
        assert f"<b>{html.escape(label)}</b>" in text
    assert "95% CI" in text

    png = path.parent / PER_CLASS_PNG
    assert png.read_bytes().startswith(b"\x89PNG")
    assert f'src="{PER_CLASS_PNG}"' in text

    if _n_robust_flips(comparison):
        assert (path.parent / ROBUST_GRID_PNG).read_bytes().startswith(b"\x89PNG")
        assert f'src="{ROBUST_GRID_PNG}"' in text
    if int(pc.sum(comparison.flips.column("neg_flip")).as_py() or 0):
        assert (path.parent / CLEAN_GRID_PNG).read_bytes().startswith(b"\x89PNG")


def test_report_shows_the_sanity_checks(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    store, comparison = stored
    text = write_report(store, comparison.key, tmp_path / "rep").read_text(encoding="utf-8")
    assert "AutoAttack's sanity checks: old model: no flag; new model: no flag." in text
    assert 'class="warning"' not in text


def test_a_flagged_evaluation_is_shown_first(tmp_path: Path) -> None:
    """A new model that outputs probabilities: the report opens with AutoAttack's warning, before the numbers."""
    store = ResultStore(tmp_path / "store")
    train = load_split(DataConfig(name="digits", split="train"))
    split = load_split(DATA)
    settings = EvaluationSettings(data=DATA, attack=ATTACK, chunk_size=20, store=str(store.root))
    old = _trained(0, 15, OLD_LABEL, train)
    softmax = torch.nn.Sequential(old.module, torch.nn.Softmax(dim=1))
    new = from_module(softmax, name="softmax", num_classes=10, source=old.source)
    keys = []
    for model in (old, new):
        plan = EvaluationPlan(model, split, ATTACK, chunk_size=20)
        for chunk in plan.chunks():
            run_chunk(plan, chunk, store, device=torch.device("cpu"), keep_adversarial=False)
        assemble(plan, store, settings)
        keys.append(plan.key)
    comparison = compare_stored(store, keys[0], keys[1], BootstrapConfig(n_resamples=20))
    text = write_report(store, comparison.key, tmp_path / "rep").read_text(encoding="utf-8")
    warning = text.index('class="warning"')
    assert warning < text.index("<h2>Summary</h2>")
    assert "new model: sanity flags: probability_outputs" not in text  # the prefix is left to the page
    assert "new model: probability_outputs" in text and "old model: no flag" in text


def test_report_shows_the_near_flips(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    """The near-flip section: the margin histogram, and as many listed samples as the summary counts (up to
    top_k), lowest new margin first."""
    store, default = stored
    old_key, new_key = default.manifest["old_table"], default.manifest["new_table"]
    wide = compare_stored(store, old_key, new_key, BootstrapConfig(n_resamples=100), near_margin=2.0)
    assert wide.key != default.key  # the threshold is part of a comparison's key
    for comparison in (default, wide):
        path = write_report(store, comparison.key, tmp_path / comparison.key, top_k=50)
        text = path.read_text(encoding="utf-8")
        assert (path.parent / MARGINS_PNG).read_bytes().startswith(b"\x89PNG")
        margin = comparison.summary["near_margin"]
        near = comparison.summary["metrics"]["near_flip"]
        count = round(near["value"] * near["n"])
        assert f"{count} sample" in text and f"near-flip threshold ({margin})" in text
        chosen, total = nearest_near_flips(comparison.flips, margin=margin, top_k=50)
        assert total == count and [f.score for f in chosen] == sorted(f.score for f in chosen)
        assert all(f.old_robust and f.new_robust and f.score < margin for f in chosen)
        assert (path.parent / NEAR_GRID_PNG).exists() == bool(count)
    assert round(wide.summary["metrics"]["near_flip"]["value"] * wide.summary["metrics"]["near_flip"]["n"]) > 0


def test_fixture_has_robust_negative_flips(stored: tuple[ResultStore, Comparison]) -> None:
    """Guards the other tests: without robust flips the image grid would silently go untested."""
    _, comparison = stored
    assert _n_robust_flips(comparison) > 0


def test_second_call_replaces_atomically(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    store, comparison = stored
    out = tmp_path / "rep"
    first = write_report(store, comparison.key, out, top_k=2).read_text(encoding="utf-8")
    second_path = write_report(store, comparison.key, out, top_k=3)
    second = second_path.read_text(encoding="utf-8")
    assert second.startswith("<!DOCTYPE html>") and second.rstrip().endswith("</html>")
    assert first != second  # top_k changed what is listed, so the file really was replaced
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert {p.name for p in out.iterdir()} <= {
        REPORT_NAME,
        PER_CLASS_PNG,
        ROBUST_GRID_PNG,
        CLEAN_GRID_PNG,
        MARGINS_PNG,
        NEAR_GRID_PNG,
    }


def test_failure_keeps_previous_report(
    stored: tuple[ResultStore, Comparison], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, comparison = stored
    out = tmp_path / "rep"
    before = write_report(store, comparison.key, out).read_bytes()

    def broken(*_args: object, **_kwargs: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "_page", broken)
    with pytest.raises(RuntimeError, match="boom"):
        write_report(store, comparison.key, out)
    assert (out / REPORT_NAME).read_bytes() == before
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []


def test_renders_without_images(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    """Images come from the store's sample set only: a store without it gives a report that says so (and how
    to put the set there) instead of decoding the dataset in the driver."""
    store, comparison = stored
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    shutil.rmtree(samples_location(str(root), DATA))
    path = write_report(ResultStore(root), comparison.key, tmp_path / "rep")
    text = path.read_text(encoding="utf-8")
    assert "Images are not shown" in text and "holds no sample set" in text and "data prepare" in text
    assert not (path.parent / ROBUST_GRID_PNG).exists()
    assert (path.parent / PER_CLASS_PNG).exists()


def test_reversed_pair_shows_clean_flips(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    """new -> old turns the better model into the "old" one, so clean negative flips appear."""
    store, comparison = stored
    rev = compare_stored(store, comparison.new["key"], comparison.old["key"], BootstrapConfig(n_resamples=10))
    n_neg = int(pc.sum(rev.flips.column("neg_flip")).as_py() or 0)
    assert n_neg > 0
    path = write_report(store, rev.key, tmp_path / "rev", top_k=2)
    text = path.read_text(encoding="utf-8")
    assert (path.parent / CLEAN_GRID_PNG).read_bytes().startswith(b"\x89PNG")
    assert f'src="{CLEAN_GRID_PNG}"' in text
    assert "wrong on clean, not attacked" in text  # the new model was never attacked on its clean errors
    assert text.index(html.escape(NEW_LABEL)) < text.index(html.escape(OLD_LABEL))  # header: old first


def test_top_k_zero_and_no_flips(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    """A comparison of a model with itself has no flips: the report says so instead of drawing grids."""
    store, comparison = stored
    same = compare_stored(store, comparison.old["key"], comparison.old["key"], BootstrapConfig(n_resamples=10))
    text = write_report(store, same.key, tmp_path / "same").read_text(encoding="utf-8")
    assert "introduced no robust negative flips" in text
    assert "introduced no clean negative flips" in text
    assert not (tmp_path / "same" / ROBUST_GRID_PNG).exists()
    write_report(store, comparison.key, tmp_path / "k0", top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        write_report(store, comparison.key, tmp_path / "bad", top_k=-1)


def test_summary_values_are_percentages(stored: tuple[ResultStore, Comparison], tmp_path: Path) -> None:
    store, comparison = stored
    text = write_report(store, comparison.key, tmp_path / "rep").read_text(encoding="utf-8")
    acc = comparison.summary["metrics"]["acc"]
    assert f"{acc['value'] * 100:.2f}%" in text


def test_report_module_does_not_import_ray() -> None:
    """The report is part of the Ray-free side: it must be usable where Ray is not installed."""
    code = "import sys, rcat_ray.report.flip_report; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_one_number_formatter() -> None:
    """Every page and table formats a rate the same way; undefined values (None, NaN, pandas' NA) as ``missing``."""
    import pandas as pd

    from rcat_ray.core.numbers import percent, percent_ci, percent_interval, signed

    assert percent(0.12345) == "12.35" and percent(0.5, 1, unit="%") == "50.0%"
    assert percent(-0.01, sign=True) == "-1.00" and percent(0.01, sign=True) == "+1.00"
    assert [percent(v) for v in (None, float("nan"), pd.NA, float("inf"), "x")] == ["-"] * 5
    assert percent(None, missing="n/a") == "n/a"
    assert percent_interval(0.1, 0.2) == "[10.00, 20.00]" and percent_interval(0.1, None) == "-"
    assert percent_ci(0.15, 0.1, 0.2) == "15.00 [10.00, 20.00]" and percent_ci(0.15, None, 0.2) == "15.00"
    assert percent_ci(None, 0.1, 0.2, missing="") == ""
    assert signed(1.234) == "+1.23" and signed(None) == "n/a"
    # a zero difference, or one that rounds to zero, has no minus sign ("-0.00" read as a loss)
    assert percent(-1e-9, sign=True) == "+0.00" and percent(-0.0) == "0.00" and signed(-0.001) == "+0.00"
