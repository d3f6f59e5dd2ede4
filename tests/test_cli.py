"""The CLI end to end on a real local Ray: evaluate, compare (reusing the cache), report."""

from __future__ import annotations

import json

import pytest

from rcat_ray.cli import main, parse_model_spec

pytestmark = pytest.mark.ray


def test_evaluate_then_compare_reuses_tables_then_report(ray_session, digits_checkpoints, tmp_path, capsys):
    checkpoints = digits_checkpoints
    store = tmp_path / "store"
    common = [
        "--data",
        "digits",
        "--limit",
        "80",
        "--eps",
        "0.1",
        "--n-iter",
        "5",
        "--chunk-size",
        "40",
        "--store",
        str(store),
        "--workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--threads-per-worker",
        "1",
    ]
    assert main(["evaluate", *common, "--model", str(checkpoints["old"])]) == 0
    out = capsys.readouterr().out
    assert "2 chunks computed, 0 reused" in out

    assert (
        main(
            [
                "compare",
                *common,
                "--old",
                str(checkpoints["old"]),
                "--new",
                str(checkpoints["new"]),
                "--bootstrap",
                "200",
                "--report",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "chunks computed" in line]
    assert "0 chunks computed, 2 reused" in lines[0]  # old: from the evaluate run
    assert "2 chunks computed, 0 reused" in lines[1]  # new: attacked now
    assert "NFR" in out and "R-NFR" in out
    (cmp_dir,) = list((store / "comparisons").iterdir())
    summary = json.loads((cmp_dir / "summary.json").read_text())
    assert summary["n_clean"] == 80 and summary["bootstrap"]["n_resamples"] == 200
    assert (tmp_path / "rep" / "report.html").is_file()

    assert main(["report", "--store", str(store), "--comparison", cmp_dir.name, "--out", str(tmp_path / "r2")]) == 0
    html = (tmp_path / "r2" / "report.html").read_text()
    assert "R-NFR" in html


def test_train_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    from rcat_ray.config import ModelConfig
    from rcat_ray.core.models import load_model

    out = tmp_path / "digits-old.pt"
    argv = ["train", "--data", "digits", "--arch", "mlp", "--epochs", "2", "--eps", "0.1", "--out", str(out)]
    assert main(argv) == 0
    model = load_model(ModelConfig(source="checkpoint", name="m", path=str(out)), num_classes=10, input_shape=(1, 8, 8))
    assert model.source["metadata"]["recipe"]["epochs"] == 2 and len(model.source["metadata"]["losses"]) == 2
    assert main(argv) == 2  # an existing checkpoint is never overwritten
    assert "exists" in capsys.readouterr().err


def test_model_specs():
    assert parse_model_spec("robustbench:Carmon2019Unlabeled") == {
        "source": "robustbench",
        "name": "Carmon2019Unlabeled",
    }
    assert parse_model_spec("builtin:mlp") == {"source": "builtin", "name": "mlp"}
    assert parse_model_spec("a/b/m.pt")["path"] == "a/b/m.pt"
    assert parse_model_spec("checkpoint:x.bin")["source"] == "checkpoint"


def test_core_and_cli_import_no_ray():
    """The core is Ray-free (docs/architecture.md, "The import rule"), and the CLI must not import Ray before it
    has set the local-Ray environment (loopback binding) that Ray reads at import."""
    import subprocess
    import sys

    code = (
        "import sys, rcat_ray.cli, rcat_ray.errors, rcat_ray.core.data, rcat_ray.core.models, rcat_ray.core.attacks, "
        "rcat_ray.core.flips, rcat_ray.core.losses, rcat_ray.core.finetune_epoch, rcat_ray.core.validation, "
        "rcat_ray.evaluate.plan, rcat_ray.store.result_store; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
