"""Smoke tests of the memory benchmarks (bench/_measure.py, bench/scale_memory.py): the /proc polling sees a
command's own peak and its children's, the synthetic ``tensors`` file reads back through the project's reader,
and one tiny evaluation runs through the real CLI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
MIB = 2**20


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_driver_and_each_descendant_get_their_own_peak():
    measure = _load("_measure")
    child = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    parent = f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {child!r}]); time.sleep(0.3)"
    m = measure.run_measured([sys.executable, "-c", parent], every=0.05)
    assert m.returncode == 0
    (peak,) = [p for p in m.processes.values() if "bytearray" in p.title]
    assert peak.peak >= 300 * MIB  # the child's 300 MiB, counted for the child only
    assert m.driver_peak < 150 * MIB
    assert peak.kind == "worker" and m.worker_peak().pid == peak.pid


def test_results_section_is_replaced_between_its_markers(tmp_path):
    measure = _load("_measure")
    path = tmp_path / "r.md"
    path.write_text("# title\n\nkept\n")
    measure.write_section(path, "x", "first")
    measure.write_section(path, "x", "second")
    text = path.read_text()
    assert text.startswith("# title\n\nkept\n") and "second" in text and "first" not in text
    assert text.count("<!-- x:begin -->") == 1


def test_the_synthetic_tensors_file_is_what_the_project_reads(tmp_path):
    from rcat_ray.config import DataConfig
    from rcat_ray.core.data import load_split

    scale = _load("scale_memory")
    path = tmp_path / "s.npz"
    scale.write_npz(path, 600, shape=(3, 8, 8))
    images, labels = scale.synthetic_block(0, 600, (3, 8, 8), 0)
    with np.load(path) as z:
        assert np.array_equal(z["images"], images) and np.array_equal(z["labels"], labels)
    split = load_split(DataConfig(name="tensors", path=str(path), split="test"))
    assert np.array_equal((split.images * 255).round().numpy().astype(np.uint8), images)


@pytest.mark.slow
def test_scale_memory_runs_an_evaluation_through_the_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH / "scale_memory.py"),
            "--sizes",
            "260",
            "--commands",
            "evaluate",
            "--val-size",
            "10",
            "--chunk-size",
            "130",
            "--keep",
            str(tmp_path),
            "--no-write",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| tensors | evaluate | 260 | 1 |" in out.stdout
