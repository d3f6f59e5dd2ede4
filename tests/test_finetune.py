"""Fine-tuning on Ray Train: local mode, 2 DDP workers, fault tolerance, and bad configs failing early."""

from __future__ import annotations

import json

import pytest
import torch

import rcat_ray.distributed.train as train_mod
from rcat_ray.cli import main
from rcat_ray.config import FinetuneConfig, ModelConfig, parse_config
from rcat_ray.core.models import build_architecture, load_model, save_checkpoint


@pytest.fixture
def parents(digits_checkpoints):
    return digits_checkpoints


def _cfg(tmp_path, parents, **kw) -> FinetuneConfig:
    raw = {
        "old": {"source": "checkpoint", "name": "old", "path": str(parents["old"])},
        "new": {"source": "checkpoint", "name": "new", "path": str(parents["new"])},
        "data": {"name": "digits", "split": "train"},
        "loss": {"kind": "rcat", "alpha": 0.5, "beta": 0.4},
        "train_attack": {"kind": "fgsm-rs", "eps": 0.1},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "epochs": 2,
        "batch_size": 64,
        "validation": {"samples": 100},
        "out": str(tmp_path / "out"),
        "storage": str(tmp_path / "ray_results"),
        "num_workers": 0,
        "threads_per_worker": 1,
    }
    for key, value in kw.items():
        raw[key] = value
    return parse_config(FinetuneConfig, raw)


def _check_outcome(outcome, cfg, parents, epochs):
    assert [int(h["epoch"]) for h in outcome.history] == list(range(epochs))
    for h in outcome.history:
        assert h["train_loss"] >= 0 and h["train_loss"] == h["train_loss"]  # finite, not NaN
        for key in ("val_acc", "val_rob_acc", "val_nfr", "val_r_nfr", "val_s_nfr"):
            assert 0 <= h[key] <= 1, (key, h)
        assert h["val_rob_acc"] <= h["val_acc"]
    manifest = json.loads(outcome.manifest.read_text())
    assert manifest["epochs_completed"] == epochs
    old = load_model(
        ModelConfig(source="checkpoint", name="o", path=str(parents["old"])), num_classes=10, input_shape=(1, 8, 8)
    )
    assert manifest["parents"]["old"]["fingerprint"] == old.fingerprint
    tuned = load_model(
        ModelConfig(source="checkpoint", name="t", path=str(outcome.checkpoint)), num_classes=10, input_shape=(1, 8, 8)
    )
    assert tuned.fingerprint == outcome.fingerprint != manifest["parents"]["new"]["fingerprint"]
    assert tuned.source["metadata"]["old_fingerprint"] == old.fingerprint


@pytest.mark.parametrize("kind", ["rcat", "pct", "pcat", "at"])
def test_local_mode_every_method(tmp_path, parents, kind):
    loss = {"kind": kind, "alpha": 0.5 if kind == "rcat" else 1.0, "beta": 0.4 if kind == "rcat" else 2.0}
    cfg = _cfg(tmp_path, parents, loss=loss, epochs=1)
    outcome = train_mod.run_finetune(cfg)
    _check_outcome(outcome, cfg, parents, 1)


@pytest.mark.slow
@pytest.mark.ray
def test_two_ddp_workers_report_every_epoch(ray_session, tmp_path, parents):
    cfg = _cfg(tmp_path, parents, num_workers=2)
    outcome = train_mod.run_finetune(cfg)
    _check_outcome(outcome, cfg, parents, 2)


@pytest.mark.slow
@pytest.mark.ray
def test_worker_fault_resumes_from_last_checkpoint(ray_session, tmp_path, parents):
    cfg = _cfg(tmp_path, parents, num_workers=2, epochs=3, fail_once_at_epoch=1, max_failures=1)
    outcome = train_mod.run_finetune(cfg)
    marker = tmp_path / "ray_results" / cfg.run_name / ".fault-injected"
    assert marker.read_text().startswith("rank 1 epoch 1")  # the fault really happened, on rank 1
    _check_outcome(outcome, cfg, parents, 3)
    # the restarted group resumed at epoch 1 from the epoch-0 checkpoint, not from scratch
    assert [h["attempt_start_epoch"] for h in outcome.history] == [0, 1, 1]


def test_cached_masks_from_a_stored_table(tmp_path, parents):
    """mask_source 'cached': the old model's robustness flags come from its per-model table."""
    from rcat_ray.config import AttackConfig, DataConfig
    from rcat_ray.core.data import load_split
    from rcat_ray.evaluation import EvaluationPlan, assemble, run_chunk
    from rcat_ray.store import ResultStore

    store = ResultStore(tmp_path / "store")
    split = load_split(DataConfig(name="digits", split="train"))
    old = load_model(
        ModelConfig(source="checkpoint", name="o", path=str(parents["old"])), num_classes=10, input_shape=(1, 8, 8)
    )
    plan = EvaluationPlan(old, split, AttackConfig(eps=0.1, n_iter=3), chunk_size=600)
    for c in plan.chunks():
        run_chunk(plan, c, store, device=torch.device("cpu"), keep_adversarial=False)
    assemble(plan, store)
    cfg = _cfg(
        tmp_path,
        parents,
        epochs=1,
        store=str(tmp_path / "store"),
        cached_old_table=plan.key,
        loss={"kind": "rcat", "alpha": 0.3, "beta": 0.6, "mask_source": "cached"},
    )
    _check_outcome(train_mod.run_finetune(cfg), cfg, parents, 1)


@pytest.fixture
def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started on a bad config")

    monkeypatch.setattr(train_mod, "TorchTrainer", boom)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--alpha", "0.8", "--beta", "0.3"], "alpha + beta <= 1"),
        (["--train-eps", "-0.1"], "train_attack.eps"),
        (["--loss", "rcatt"], "loss.kind"),
        (["--new", "CLASSES5"], "disagree on the number of classes"),
    ],
)
def test_bad_configs_fail_before_training(tmp_path, parents, no_training, capsys, flags, message):
    five = tmp_path / "five.pt"
    save_checkpoint(
        five,
        build_architecture("mlp", num_classes=5, input_shape=(1, 8, 8)),
        arch="mlp",
        num_classes=5,
        input_shape=(1, 8, 8),
    )
    flags = [str(five) if f == "CLASSES5" else f for f in flags]
    argv = [
        "finetune",
        "--old",
        str(parents["old"]),
        "--new",
        str(parents["new"]),
        "--train-eps",
        "0.1",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
