"""What a newcomer types: paths that mean the same in every process, clear one-line errors with the right exit
code before any compute, machine-readable output, and incomplete runs that say what remains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rcat_ray.cli import main
from rcat_ray.config import DataConfig, ModelConfig, load_yaml, parse_config
from rcat_ray.errors import ConfigError
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.sweep.config import SweepConfig

from .conftest import snapshot

RUN_CLI = (
    "import sys; from rcat_ray.cli import main; rc = main(sys.argv[1:]); import ray; "
    "sys.stderr.write(f'RAY_STARTED={ray.is_initialized()}\\n'); sys.exit(rc)"
)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (as a user runs it), reporting at the end whether it started Ray."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# -- paths -----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_readers_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        FinetuneConfig,
        {
            "old": {"source": "checkpoint", "path": "models/old.pt"},
            "new": {"source": "checkpoint", "path": "new.pt"},
            "data": {"name": "tensors", "path": "data/x.npz", "split": "train"},
            "train_attack": {"eps": 0.1},
            "storage": "s3://bucket/ray",
            "out": "~/ft",
        },
    )
    assert cfg.old.path == str(tmp_path / "models" / "old.pt")
    assert cfg.new.name == "new"  # a checkpoint's name defaults to its file stem
    assert cfg.data.path == str(tmp_path / "data" / "x.npz")
    assert cfg.store == str(tmp_path / "results")  # defaults are resolved too
    assert cfg.storage == "s3://bucket/ray"  # URIs are left alone
    assert cfg.out == str(Path.home() / "ft")
    assert cfg.old.model_dir == str(tmp_path / "models")
    # a Ray worker validates the config again in another folder: nothing moves
    monkeypatch.chdir("/")
    again = parse_config(FinetuneConfig, cfg.model_dump(mode="json"))
    assert again == cfg

    nightly = parse_config(
        NightlyConfig,
        {
            "attack": {"eps": 0.1},
            "baseline": {"source": "builtin", "name": "mlp"},
            "candidate_dir": "cands",
            "notify": {"kind": "file", "path": "n.jsonl"},
        },
    )
    assert nightly.candidate_dir == "/cands" and nightly.notify.path == "/n.jsonl" and nightly.history == "/history"


def test_sweep_and_model_sources_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = parse_config(
        SweepConfig,
        {
            "base": {
                "old": {"source": "builtin", "name": "mlp"},
                "new": {"source": "builtin", "name": "mlp"},
                "train_attack": {"eps": 0.1},
            },
            "out": "sweep-out/x",
        },
    )
    assert sweep.out == str(tmp_path / "sweep-out" / "x") and sweep.storage == str(tmp_path / "ray_results")
    assert sweep.base.storage == str(tmp_path / "ray_results")
    with pytest.raises(ConfigError, match=r"name .the RobustBench zoo name. is required"):
        parse_config(ModelConfig, {"source": "robustbench"})
    assert parse_config(DataConfig, {"root": "d"}).root == str(tmp_path / "d")


# -- one-line errors ---------------------------------------------------------------------------------


def test_invalid_yaml_is_one_line_with_file_line_and_column(tmp_path, no_compute, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits}\nattack: {eps: 0.1\nold: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:\d+: invalid YAML"):
        load_yaml(bad)
    assert main(["evaluate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml:3:" in err[0] and "Traceback" not in err[0]


def test_errors_name_the_flag_the_user_typed(no_compute, capsys):
    assert main(["evaluate", "--data", "digits", "--model", "builtin:mlp"]) == 2
    assert "--eps is required" in capsys.readouterr().err
    assert (
        main(["finetune", "--old", "a.pt", "--new", "b.pt", "--alpha", "0.7", "--beta", "0.6", "--train-eps", "0.1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "alpha=0.7 + beta=0.6 = 1.3" in err and "1.29999" not in err
    assert main(["finetune", "--old", "a.pt", "--new", "b.pt"]) == 2
    assert "--train-eps is required" in capsys.readouterr().err
    assert main(["evaluate", "--data", "digits", "--eps", "0.1", "--model", "builtin:mlp", "--limit", "0"]) == 2
    assert "--limit (data.limit)" in capsys.readouterr().err


def test_finetune_checks_inputs_before_ray(digits_checkpoints, tmp_path, no_compute, capsys):
    from rcat_ray.core.models import build_architecture, save_checkpoint

    fashion = tmp_path / "fashion.pt"
    save_checkpoint(
        fashion,
        build_architecture("small_cnn", num_classes=10, input_shape=(1, 28, 28)),
        arch="small_cnn",
        num_classes=10,
        input_shape=(1, 28, 28),
    )
    base = [
        "finetune",
        "--old",
        str(digits_checkpoints["old"]),
        "--train-eps",
        "0.1",
        "--workers",
        "2",
        "--data",
        "digits",
        "--storage",
        str(tmp_path / "rr"),
        "--out",
        str(tmp_path / "ft"),
        "--store",
        str(tmp_path / "store"),
    ]
    assert main([*base, "--new", str(fashion)]) == 2
    assert "cannot run on digits" in capsys.readouterr().err
    # --data is honoured (today it silently trained on Fashion-MNIST): a val tail as large as digits' train file
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: digits, split: train, val_size: 1297}\n")
    assert main([*base, "--new", str(digits_checkpoints["new"]), "--config", str(cfg)]) == 2
    assert "val_size=1297 is not below the 1297 samples of scikit-learn's digits" in capsys.readouterr().err
    assert not (tmp_path / "rr").exists() and not (tmp_path / "ft").exists()


def test_empty_selection_states_the_split_size(no_compute, capsys):
    assert main(["evaluate", "--data", "digits", "--eps", "0.1", "--model", "builtin:mlp", "--offset", "600"]) == 2
    assert "split 'test' has 500 samples and data.offset is 600" in capsys.readouterr().err


def test_a_sweep_whose_trials_all_failed_says_why_in_one_message():
    from rcat_ray.errors import SweepFailedError
    from rcat_ray.sweep.trials import raise_if_all_failed as _raise_if_all_failed

    trials = pd.DataFrame(
        {
            "trial_id": ["a_00000", "a_00001"],
            "val_s_nfr": [None, None],
            "error": ["Traceback (most recent call last):\n  ...\nModelError: checkpoint not found: m.pt", "boom"],
        }
    )
    with pytest.raises(SweepFailedError, match=r"all 2 trials failed; the first \(a_00000\): ModelError: checkpoint"):
        _raise_if_all_failed(trials)
    trials.loc[1, ["val_s_nfr", "error"]] = [0.1, None]
    _raise_if_all_failed(trials)  # one trial with metrics is enough to choose


def test_version():
    done = subprocess.run(
        [sys.executable, "-m", "rcat_ray.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("rcat-ray ")


# -- runs on Ray -------------------------------------------------------------------------------------


def _digits_eval(store: Path, *extra: str) -> list[str]:
    return [
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
        "1",
        "--threads-per-worker",
        "1",
        *extra,
    ]


@pytest.mark.ray
def test_incomplete_runs_exit_3_and_say_what_remains(ray_session, digits_checkpoints, tmp_path, capsys):
    old, new = str(digits_checkpoints["old"]), str(digits_checkpoints["new"])
    store = tmp_path / "store"
    assert main(["evaluate", *_digits_eval(store, "--max-new-chunks", "1"), "--model", old]) == 3
    assert "incomplete: old: 1 of 2 chunks remain; run the same command again" in capsys.readouterr().err
    assert main(["compare", *_digits_eval(store, "--max-new-chunks", "1"), "--old", old, "--new", new]) == 3
    assert "new: 2 of 2 chunks remain" in capsys.readouterr().err
    assert not (store / "comparisons").exists()
    table = tmp_path / "t.yaml"
    table.write_text(
        json.dumps(
            {
                "pairs": [
                    {
                        "name": "p",
                        "old": {"source": "checkpoint", "path": old},
                        "new": {"source": "checkpoint", "path": new},
                    }
                ]
            }
        )
    )
    out = tmp_path / "tab"
    assert (
        main(["table", "--config", str(table), *_digits_eval(store, "--max-new-chunks", "1"), "--out", str(out)]) == 3
    )
    assert "incomplete:" in capsys.readouterr().err and not out.exists()

    # the same command finishes the work; --json puts the result on stdout and the human lines on stderr
    assert main(["compare", *_digits_eval(store), "--old", old, "--new", new, "--json", "--bootstrap", "50"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["old"] == "old" and result["new"] == "new" and "chunks computed" in captured.err
    assert set(result["summary"]["metrics"]) >= {"nfr", "r_nfr", "s_nfr", "acc", "rob_acc"}
    assert [t["chunks_computed"] for t in result["tables"]] == [0, 1] or result["tables"][1]["complete"]
    assert 0 <= result["tables"][0]["accuracy"]["acc"] <= 1


@pytest.mark.ray
def test_evaluate_prints_accuracy_and_tells_same_named_models_apart(ray_session, digits_checkpoints, tmp_path, capsys):
    store = tmp_path / "store"
    twin = tmp_path / "b" / "old.pt"  # another model whose file is also called old.pt
    twin.parent.mkdir()
    twin.write_bytes(digits_checkpoints["new"].read_bytes())
    assert (
        main(
            [
                "evaluate",
                *_digits_eval(store),
                "--model",
                str(digits_checkpoints["old"]),
                "--model",
                str(twin),
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    tables = json.loads(captured.out)["tables"]
    names = [t["model"] for t in tables]
    assert len(set(names)) == 2 and all(n.startswith("old [") for n in names)
    assert "clean acc" in captured.err and "robust acc" in captured.err


@pytest.mark.ray
def test_compare_of_stored_tables_starts_no_ray(ray_session, digits_checkpoints, tmp_path):
    old, new = str(digits_checkpoints["old"]), str(digits_checkpoints["new"])
    store = tmp_path / "store"
    assert main(["evaluate", *_digits_eval(store), "--model", old, "--model", new]) == 0
    before = snapshot(store / "tables")
    done = run_cli(["compare", *_digits_eval(store), "--old", old, "--new", new, "--bootstrap", "50"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RAY_STARTED=False" in done.stderr
    assert "R-NFR" in done.stdout
    assert snapshot(store / "tables") == before
