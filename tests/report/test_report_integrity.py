"""The report reads every stored artifact through the checksums its manifest records.

A real store (digits, two trained MLPs, real attacks, as in test_report) is copied for each test and one
byte of one file is altered: the report then stops with one line naming that file, and the file's artifact
is moved to the store's quarantine, as ``compare`` and ``evaluate`` do. An intact copy still gives a report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rcat_ray.core.samples import prepare_samples, samples_location
from rcat_ray.errors import StoreError
from rcat_ray.evaluate.comparison import Comparison
from rcat_ray.report.comparison_data import worst_flips
from rcat_ray.report.flip_report import REPORT_NAME, ROBUST_GRID_PNG, write_report
from rcat_ray.store.result_store import ResultStore
from tests.report.test_report import DATA, _build_store


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Comparison]:
    """The store of test_report, built once (one torch thread, as there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("built") / "store"
        _, comparison = _build_store(root)
        return root, comparison
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def copy(built: tuple[Path, Comparison], tmp_path: Path) -> tuple[Path, Comparison]:
    """A private copy of the store, free to damage."""
    root, comparison = built
    dest = tmp_path / "store"
    shutil.copytree(root, dest)
    return dest, comparison


def _alter(path: Path) -> None:
    """Flip one byte in the middle: same size, so only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _quarantined(root: Path, rel: str) -> list[Path]:
    return sorted(p for p in (root / "quarantine").glob(f"*/{rel}") if p.is_file())


def _first_adversarial_with_a_shown_sample(root: Path, comparison: Comparison) -> str:
    """The old table's adv-*.npz file that holds the worst robust flip (the report must read it)."""
    import numpy as np

    worst, _ = worst_flips(comparison.flips, robust=True, top_k=1)
    assert worst, "the fixture has robust negative flips (test_report guards this)"
    folder = root / "tables" / comparison.manifest["old_table"] / "chunks"
    for npz in sorted(folder.glob("adv-*.npz")):
        with np.load(npz) as z:
            if worst[0].sample_id in z["sample_id"]:
                return str(npz.relative_to(root))
    raise AssertionError("no adversarial file holds the worst robust flip")


def test_intact_store_writes_the_report(copy: tuple[Path, Comparison], tmp_path: Path) -> None:
    root, comparison = copy
    path = write_report(ResultStore(root), comparison.key, tmp_path / "rep")
    assert path.name == REPORT_NAME and (path.parent / ROBUST_GRID_PNG).exists()
    assert "Images are not shown" not in path.read_text(encoding="utf-8")
    assert not (root / "quarantine").exists()


@pytest.mark.parametrize(
    "which",
    ["old table", "new table", "old table manifest", "flips", "summary", "comparison manifest", "adversarial"],
)
def test_a_damaged_artifact_stops_the_report_naming_the_file(
    copy: tuple[Path, Comparison], tmp_path: Path, which: str
) -> None:
    root, comparison = copy
    m = comparison.manifest
    rel = {
        "old table": f"tables/{m['old_table']}/table.parquet",
        "new table": f"tables/{m['new_table']}/table.parquet",
        "old table manifest": f"tables/{m['old_table']}/manifest.json",
        "flips": f"comparisons/{comparison.key}/flips.parquet",
        "summary": f"comparisons/{comparison.key}/summary.json",
        "comparison manifest": f"comparisons/{comparison.key}/manifest.json",
        "adversarial": _first_adversarial_with_a_shown_sample(root, comparison),
    }[which]
    if rel.endswith(".json"):
        (root / rel).write_text("{ not json", encoding="utf-8")  # a manifest that no longer parses
    else:
        _alter(root / rel)
    out = tmp_path / "rep"
    with pytest.raises(StoreError) as err:
        write_report(ResultStore(root), comparison.key, out)
    message = str(err.value)
    assert "\n" not in message
    assert rel in message and "damaged artifact" in message
    assert _quarantined(root, rel), f"{rel} was not moved aside"
    assert not (root / rel).exists()
    assert not (out / REPORT_NAME).exists()
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []


def test_samples_that_are_not_the_evaluated_ones_are_not_shown(copy: tuple[Path, Comparison], tmp_path: Path) -> None:
    """A sound set that holds other samples than the table records (another selection moved into its place)
    is not shown: the report says so instead."""
    root, comparison = copy
    location = Path(samples_location(str(root), DATA))
    other = tmp_path / "other"
    prepare_samples(DATA.model_copy(update={"offset": 1}), other, rows_per_group=20)
    shutil.rmtree(location)
    shutil.move(other, location)
    text = write_report(ResultStore(root), comparison.key, tmp_path / "rep").read_text(encoding="utf-8")
    assert "Images are not shown" in text and "are not the samples that were evaluated" in text
    assert not (tmp_path / "rep" / ROBUST_GRID_PNG).exists()
