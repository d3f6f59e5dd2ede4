"""A fine-tune is what it was trained from: identity, verified inputs, reuse and resume only on a matching identity.

Through the CLI (in-process local mode, digits): a named fine-tune re-run with another weight or loss trains a new
model with its own manifest; an exact output path holding another fine-tune stops the command (exit 2) and is left
as it was; a parent retrained in place gives a new fine-tune; the same command again reuses its result. Below the
CLI: workers refuse parents and sets other than the driver's, a snapshot of another identity is never loaded, the
cached-mask table is read through its checksum and must be the old model's on the training selection, and the
training order does not depend on how the set was stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import rcat_ray.finetune.ray_train as train_mod
import rcat_ray.finetune.run as run_mod
from rcat_ray.cli import main
from rcat_ray.config import ModelConfig
from rcat_ray.core.models import load_model, save_checkpoint
from rcat_ray.core.samples import samples_in_store
from rcat_ray.errors import ModelFingerprintError, RunIdentityError
from rcat_ray.finetune.checkpoints import STATE_FILE, write_final
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.identity import IdentityInputs, finetune_identity
from tests.finetune.configs import digits_finetune


def _weights(path: Path) -> dict[str, torch.Tensor]:
    m = load_model(ModelConfig(source="checkpoint", name="t", path=str(path)), num_classes=10, input_shape=(1, 8, 8))
    return m.module.state_dict()


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def cli(tmp_path, digits_checkpoints, capsys):
    """``rcat-ray finetune`` with this test's models and folders (validation on 50 samples); returns
    (exit code, printed text)."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"validation": {"samples": 50}}))

    def run(*flags: str) -> tuple[int, str]:
        argv = [
            "finetune",
            "--config",
            str(base),
            "--old",
            str(digits_checkpoints["old"]),
            "--new",
            str(digits_checkpoints["new"]),
            "--data",
            "digits",
            "--train-eps",
            "0.1",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
            "--storage",
            str(tmp_path / "ray_results"),
            "--store",
            str(tmp_path / "store"),
            *flags,
        ]
        rc = main(argv)
        captured = capsys.readouterr()
        return rc, captured.out + captured.err

    return run


def _only_new(folder: Path, before: set[Path]) -> Path:
    (made,) = set(folder.glob("*.pt")) - before
    return made


def test_a_named_finetune_rerun_with_other_settings_trains_a_new_model(tmp_path, cli):
    out = tmp_path / "out"
    assert cli("--name", "same", "--loss", "rcat", "--alpha", "0.5", "--beta", "0.4")[0] == 0
    first = _only_new(out, set())
    assert cli("--name", "same", "--loss", "rcat", "--alpha", "0.3", "--beta", "0.4")[0] == 0
    second = _only_new(out, {first})
    assert cli("--name", "same", "--loss", "at")[0] == 0
    third = _only_new(out, {first, second})
    w1, w2, w3 = _weights(first), _weights(second), _weights(third)
    assert _differ(w1, w2) and _differ(w1, w3) and _differ(w2, w3)
    manifests = [json.loads(p.with_suffix(".json").read_text()) for p in (first, second, third)]
    assert [m["method"] for m in manifests] == ["RCAT(0.5,0.4)", "RCAT(0.3,0.4)", "AT"]
    assert [m["config"]["loss"]["alpha"] for m in manifests[:2]] == [0.5, 0.3]
    assert len({m["identity"] for m in manifests}) == 3
    for path, m in zip((first, second, third), manifests, strict=True):
        assert path.name == f"same-{m['identity'][:16]}.pt"
        assert (
            load_model(
                ModelConfig(source="checkpoint", path=str(path)), num_classes=10, input_shape=(1, 8, 8)
            ).fingerprint
            == m["fingerprint"]
        )
    # the first command again: the same identity, so its result is reused, untouched
    mtime = first.stat().st_mtime_ns
    rc, text = cli("--name", "same", "--loss", "rcat", "--alpha", "0.5", "--beta", "0.4")
    assert rc == 0 and "reused" in text
    assert first.stat().st_mtime_ns == mtime and set(out.glob("*.pt")) == {first, second, third}


def test_an_exact_output_path_holding_another_finetune_stops_the_command(tmp_path, cli):
    target = tmp_path / "out" / "chosen.pt"
    assert cli("--output", str(target), "--loss", "rcat", "--alpha", "0.5", "--beta", "0.4")[0] == 0
    before = target.read_bytes(), target.with_suffix(".json").read_bytes()
    recorded = json.loads(before[1])["identity"]
    rc, text = cli("--output", str(target), "--loss", "at")
    assert rc == 2
    assert recorded in text and "asks for" in text and "not overwritten" in text
    asked = text.split("asks for ")[1].split()[0]
    assert len(asked) == 64 and asked != recorded
    assert (target.read_bytes(), target.with_suffix(".json").read_bytes()) == before
    assert not list((tmp_path / "ray_results").glob(f"finetune-at-{asked[:16]}*")), "nothing trained"
    # the same fine-tune as the one there: reused
    rc, text = cli("--output", str(target), "--loss", "rcat", "--alpha", "0.5", "--beta", "0.4")
    assert rc == 0 and "reused" in text and target.read_bytes() == before[0]


def test_a_parent_retrained_in_place_gives_a_new_finetune(tmp_path, cli, digits_checkpoints):
    out = tmp_path / "out"
    assert cli("--name", "p", "--loss", "at")[0] == 0
    first = _only_new(out, set())
    new = load_model(
        ModelConfig(source="checkpoint", path=str(digits_checkpoints["new"])), num_classes=10, input_shape=(1, 8, 8)
    )
    with torch.no_grad():
        for p in new.module.parameters():
            p.mul_(0.9)  # "retrained": other weights under the same path
    retrained = save_checkpoint(
        digits_checkpoints["new"],
        new.module,
        arch="mlp",
        num_classes=10,
        input_shape=(1, 8, 8),
        arch_kwargs=new.source["arch_kwargs"],
    )
    rc, text = cli("--name", "p", "--loss", "at")
    assert rc == 0 and "reused" not in text
    second = _only_new(out, {first})
    m1, m2 = (json.loads(p.with_suffix(".json").read_text()) for p in (first, second))
    assert m2["parents"]["new"]["fingerprint"] == retrained != m1["parents"]["new"]["fingerprint"] == new.fingerprint
    assert _differ(_weights(first), _weights(second))


def _cfg(tmp_path: Path, parents: dict[str, Path], **kw) -> FinetuneConfig:
    kw.setdefault("epochs", 1)
    return digits_finetune(tmp_path, parents, **kw)


class _Session:
    """One in-process rank without DDP."""

    rank, world, device, persistent_checkpoints = 0, 1, torch.device("cpu"), False

    def __init__(self, checkpoint=None):
        self.checkpoint = checkpoint

    def prepare_model(self, module):
        return module

    def get_checkpoint(self):
        return self.checkpoint

    def report(self, metrics, checkpoint_dir):
        pass


def test_identity_ignores_placement_and_outputs_and_covers_every_training_setting(tmp_path, digits_checkpoints):
    cfg = _cfg(tmp_path, digits_checkpoints)
    inputs = run_mod.check_finetune_inputs(cfg).inputs
    same = _cfg(
        tmp_path / "elsewhere",
        digits_checkpoints,
        num_workers=2,
        name="x",
        threads_per_worker=2,
        validation={"samples": 20},
        max_failures=3,
    )
    assert finetune_identity(same, inputs) == finetune_identity(cfg, inputs)
    changes = [
        {"seed": 1},
        {"epochs": 2},
        {"batch_size": 32},
        {"augment": True},
        {"read_cache_mib": 1.0},
        {"loss": {"kind": "rcat", "alpha": 0.5, "beta": 0.4, "normalisation": "batch"}},
        {"train_attack": {"kind": "pgd", "eps": 0.1}},
        {"optimizer": {"name": "sgd", "lr": 0.02}},
        {"batchnorm": "per-worker"},
    ]
    digests = {finetune_identity(_cfg(tmp_path, digits_checkpoints, **c), inputs).digest for c in changes}
    assert len(digests) == len(changes) and finetune_identity(cfg, inputs).digest not in digests
    # mixed precision counts where it runs (CUDA): on the CPU the setting changes nothing
    assert finetune_identity(_cfg(tmp_path, digits_checkpoints, mixed_precision=False), inputs) == finetune_identity(
        cfg, inputs
    )
    gpu = {"gpus_per_worker": 1}
    assert finetune_identity(_cfg(tmp_path, digits_checkpoints, mixed_precision=False, **gpu), inputs) != (
        finetune_identity(_cfg(tmp_path, digits_checkpoints, **gpu), inputs)
    )
    # the worker count enters only where it changes the steps: 1097 rows at batch 64 leave 9, at batch 548 leave 1
    one, two = (
        finetune_identity(_cfg(tmp_path, digits_checkpoints, batch_size=548, num_workers=w), inputs) for w in (1, 2)
    )
    assert one != two
    for field in ("old", "new"):
        other = IdentityInputs(**{**inputs.__dict__, field: {**getattr(inputs, field), "fingerprint": "0" * 16}})
        assert finetune_identity(cfg, other) != finetune_identity(cfg, inputs)
    other_data = IdentityInputs(**{**inputs.__dict__, "training_set": "f" * 64})
    assert finetune_identity(cfg, other_data) != finetune_identity(cfg, inputs)


def test_a_worker_refuses_parents_other_than_the_drivers(tmp_path, digits_checkpoints):
    cfg = _cfg(tmp_path, digits_checkpoints)
    parents = run_mod.check_finetune_inputs(cfg)
    inputs = parents.inputs
    planned = IdentityInputs(**{**inputs.__dict__, "old": {**inputs.old, "fingerprint": "0123456789abcdef"}})
    with pytest.raises(ModelFingerprintError) as err:
        train_mod.finetune_loop(cfg, _Session(), parents.samples, planned)
    message = str(err.value)
    assert str(digits_checkpoints["old"]) in message
    assert "0123456789abcdef" in message and inputs.old["fingerprint"] in message
    replaced = IdentityInputs(**{**inputs.__dict__, "training_set": "e" * 64})
    with pytest.raises(RunIdentityError, match="sample set"):
        train_mod.finetune_loop(cfg, _Session(), parents.samples, replaced)


def test_a_snapshot_of_another_identity_is_never_resumed(tmp_path, digits_checkpoints):
    """A snapshot found under a run folder is loaded only when it records this run's identity."""
    import ray.train

    cfg = _cfg(tmp_path, digits_checkpoints)
    parents = run_mod.check_finetune_inputs(cfg)
    folder = tmp_path / "snapshot"
    folder.mkdir()
    model = load_model(cfg.new, num_classes=10, input_shape=(1, 8, 8)).module
    state = {
        "model": model.state_dict(),
        "optimizer": {},
        "epoch": 0,
        "rng_cpu": torch.get_rng_state(),
        "history": [],
        "identity": "another",
    }
    torch.save(state, folder / STATE_FILE)
    session = _Session(ray.train.Checkpoint.from_directory(str(folder)))
    with pytest.raises(RunIdentityError, match=r"belongs to fine-tune another, not to this run"):
        train_mod.finetune_loop(cfg, session, parents.samples, parents.inputs)
    with pytest.raises(RunIdentityError, match="the trained state"):
        write_final(cfg, state, [], parents)


def test_training_order_does_not_depend_on_how_the_set_was_stored(tmp_path, digits_checkpoints):
    """The same fine-tune in two stores whose training sets were prepared with other row groups (16 and 256 rows,
    as evaluate and finetune would), with a read cache smaller than the set (windowed shuffle): same weights."""
    weights = []
    for rows in (16, 256):
        cfg = _cfg(tmp_path / f"rows-{rows}", digits_checkpoints, read_cache_mib=0.02)
        prepared = samples_in_store(cfg.store, cfg.data, rows_per_group=rows)
        assert prepared.info.rows_per_group == rows and prepared.info.num_rows * prepared.info.row_nbytes > 0.02 * 2**20
        weights.append(_weights(run_mod.run_finetune(cfg).checkpoint))
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_the_test_split_of_a_tensors_file_says_it_is_the_whole_file(tmp_path, caplog):
    import numpy as np

    from rcat_ray.config import DataConfig
    from rcat_ray.core.data import load_split

    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((6, 1, 4, 4), np.uint8), labels=np.arange(6) % 2)
    with caplog.at_level("WARNING", logger="rcat_ray.core.data"):
        assert len(load_split(DataConfig(name="tensors", path=str(path), split="test"))) == 6
        load_split(DataConfig(name="tensors", path=str(path), split="test"))  # once per file
        load_split(DataConfig(name="tensors", path=str(path), split="train", val_size=2))
    warnings = [r.getMessage() for r in caplog.records if "whole file" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0] and "6 samples" in warnings[0]


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_its_own_run_at_the_uninterrupted_weights(tmp_path, digits_checkpoints):
    """``rcat-ray finetune`` on 2 workers, Ctrl+C while epoch 2 waits at the test gate (epoch 1's snapshot stored),
    then the same command again: it resumes its own run from that snapshot (epochs 2 and 3 only) and ends at the
    weights of an uninterrupted one-process run of the same identity."""
    import signal
    import subprocess
    import sys
    import time

    from rcat_ray.runtime.hooks import EPOCH_GATE_ENV
    from tests.multinode import ray_env
    from tests.runtime.test_progress_interrupt import sigint_delivered

    gate = tmp_path / "gate"
    gate.mkdir()
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"validation": {"samples": 50}}))
    output = tmp_path / "out" / "resumed.pt"
    argv = [
        str(Path(sys.executable).parent / "rcat-ray"),
        "finetune",
        "--config",
        str(base),
        "--old",
        str(digits_checkpoints["old"]),
        "--new",
        str(digits_checkpoints["new"]),
        "--data",
        "digits",
        "--train-eps",
        "0.1",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--workers",
        "2",
        "--output",
        str(output),
        "--storage",
        str(tmp_path / "ray_results"),
        "--store",
        str(tmp_path / "store"),
    ]
    env = ray_env(**{EPOCH_GATE_ENV: str(gate)})
    log = tmp_path / "first.log"
    with log.open("w") as out:
        with sigint_delivered():
            proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            snapshots = tmp_path / "ray_results"
            while not (
                len(list(gate.glob("arrived-e1-*"))) >= 2
                and any(
                    json.loads(p.read_text() or "{}").get("checkpoint_results")
                    for p in snapshots.glob("**/checkpoint_manager_snapshot.json")
                )
            ):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "epoch 2 never started"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=400)  # Ray shuts down on a loaded machine slowly
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 130 and "run the same command again to resume" in text, text[-3000:]
    assert not output.exists()
    (gate / "open-e1").touch()
    (gate / "open-e2").touch()
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    manifest = json.loads(output.with_suffix(".json").read_text())
    assert [h["attempt_start_epoch"] for h in manifest["history"]] == [0, 1, 1], "resumed from epoch 1's snapshot"
    reference = _cfg(
        tmp_path / "reference",
        digits_checkpoints,
        loss={"kind": "rcat", "alpha": 0.5, "beta": 0.4},
        epochs=3,
        optimizer={"name": "sgd", "lr": 0.001, "momentum": 0.9},
    )
    ref = run_mod.run_finetune(reference)
    assert not ref.reused
    assert json.loads(ref.manifest.read_text())["identity"] == manifest["identity"]
    w_ref, w_resumed = _weights(ref.checkpoint), _weights(output)
    for key in w_ref:
        torch.testing.assert_close(w_resumed[key], w_ref[key], atol=1e-5, rtol=0, msg=key)
