"""Bad input: a clear error (exit status 2) before any attack runs, and the store left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcat_ray.cli import main
from rcat_ray.core.models import build_architecture, save_checkpoint

from .conftest import snapshot


@pytest.fixture
def store(tmp_path) -> Path:
    """A store that already holds results, which bad input must not touch."""
    s = tmp_path / "store"
    (s / "tables" / "abc").mkdir(parents=True)
    (s / "tables" / "abc" / "table.parquet").write_bytes(b"earlier results")
    return s


@pytest.fixture
def ckpts(tmp_path) -> dict[str, Path]:
    out = {}
    digits = build_architecture("mlp", num_classes=10, input_shape=(1, 8, 8))
    out["digits"] = tmp_path / "digits.pt"
    save_checkpoint(out["digits"], digits, arch="mlp", num_classes=10, input_shape=(1, 8, 8))
    five = build_architecture("mlp", num_classes=5, input_shape=(1, 8, 8))
    out["five"] = tmp_path / "five.pt"
    save_checkpoint(out["five"], five, arch="mlp", num_classes=5, input_shape=(1, 8, 8))
    fashion = build_architecture("small_cnn", num_classes=10, input_shape=(1, 28, 28))
    out["fashion"] = tmp_path / "fashion.pt"
    save_checkpoint(out["fashion"], fashion, arch="small_cnn", num_classes=10, input_shape=(1, 28, 28))
    out["corrupt"] = tmp_path / "corrupt.pt"
    out["corrupt"].write_bytes(out["digits"].read_bytes()[:300])
    out["pickled"] = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "obj": Path("/etc")}, out["pickled"])
    return out


def _compare(store: Path, old: str, new: str, *extra: str) -> list[str]:
    return ["compare", "--data", "digits", "--eps", "0.1", "--store", str(store), "--old", old, "--new", new, *extra]


CASES = {
    "missing dataset": (
        lambda s, c, t: _compare(
            s, f"{c['digits']}", f"{c['digits']}", "--data", "cifar10", "--data-root", str(t / "nothing")
        ),
        "cifar-10-batches-py",
    ),
    "corrupt checkpoint": (
        lambda s, c, t: _compare(s, str(c["digits"]), str(c["corrupt"])),
        "not a readable PyTorch checkpoint",
    ),
    "pickled object": (lambda s, c, t: _compare(s, str(c["digits"]), str(c["pickled"])), "pickled Python objects"),
    "class mismatch": (lambda s, c, t: _compare(s, str(c["digits"]), str(c["five"])), "disagree on the number"),
    "input shape": (lambda s, c, t: _compare(s, str(c["digits"]), str(c["fashion"])), "cannot run on digits"),
    "eps below 0": (lambda s, c, t: [*_compare(s, str(c["digits"]), str(c["digits"])), "--eps", "-0.1"], "attack.eps"),
    "eps above 1": (lambda s, c, t: [*_compare(s, str(c["digits"]), str(c["digits"])), "--eps", "1.5"], "at most 1"),
    "unknown robustbench": (
        lambda s, c, t: _compare(
            s, str(c["digits"]), "robustbench:Carmon2019Unlabelled", "--data", "cifar10", "--data-root", str(t)
        ),
        "unknown RobustBench model",
    ),
    "empty split": (lambda s, c, t: _compare(s, str(c["digits"]), str(c["digits"]), "--offset", "100000"), "empty"),
    "bad model spec": (lambda s, c, t: _compare(s, "mystery", str(c["digits"])), "model spec"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_early_and_leaves_store(case, store, ckpts, tmp_path, no_compute, capsys):
    argv_fn, message = CASES[case]
    before = snapshot(store)
    code = main(argv_fn(store, ckpts, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert snapshot(store) == before


def test_misspelt_config_key(tmp_path, store, no_compute, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {name: digits}\nattack: {eps: 0.1, n_iters: 5}\nold: {source: builtin, name: mlp}\n"
        "new: {source: builtin, name: mlp}\n"
    )
    before = snapshot(store)
    assert main(["compare", "--config", str(cfg), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "attack.n_iters: unknown key (did you mean 'n_iter'?)" in err
    assert snapshot(store) == before


def test_unwritable_store(tmp_path, ckpts, no_compute, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(_compare(blocker / "store", str(ckpts["digits"]), str(ckpts["digits"]))) == 2
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"
