"""Fine-tuning on Ray Train: local mode, 2 DDP workers, fault tolerance, and bad configs failing early."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel

import rcat_ray.config as config_mod
import rcat_ray.evaluate.config
import rcat_ray.finetune.config
import rcat_ray.finetune.ray_train as train_mod
import rcat_ray.finetune.run as run_mod
import rcat_ray.nightly.config
import rcat_ray.sweep.config
from rcat_ray.cli import main
from rcat_ray.config import ModelConfig, parse_config
from rcat_ray.core.models import build_architecture, load_model, save_checkpoint
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.runtime import hooks
from tests.finetune.configs import digits_finetune


@pytest.fixture
def parents(digits_checkpoints):
    return digits_checkpoints


def _cfg(tmp_path, parents, **kw) -> FinetuneConfig:
    kw.setdefault("validation_samples", 100)
    return digits_finetune(tmp_path, parents, **kw)


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
    outcome = run_mod.run_finetune(cfg)
    _check_outcome(outcome, cfg, parents, 1)


@pytest.mark.slow
@pytest.mark.ray
def test_two_ddp_workers_report_every_epoch(ray_session, tmp_path, parents):
    cfg = _cfg(tmp_path, parents, num_workers=2)
    outcome = run_mod.run_finetune(cfg)
    _check_outcome(outcome, cfg, parents, 2)


def test_workers_rebuild_the_config_with_the_same_identity(tmp_path, parents):
    """Ray Train workers rebuild the config from its JSON dump and find the run's folder by its identity (a hash
    of the dump and the inputs' fingerprints): the driver's and the workers' must agree. A float field whose
    default was the int 256 dumped as 256 on the driver and 256.0 on the workers, and the workers wrote to
    another run's folder."""
    from rcat_ray.finetune.identity import finetune_identity

    cfg = _cfg(tmp_path, parents)
    inputs = run_mod.check_finetune_inputs(cfg).inputs
    again = parse_config(FinetuneConfig, json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert finetune_identity(again, inputs) == finetune_identity(cfg, inputs)
    modules = (
        config_mod,
        rcat_ray.evaluate.config,
        rcat_ray.finetune.config,
        rcat_ray.sweep.config,
        rcat_ray.nightly.config,
    )
    models = {m for mod in modules for m in vars(mod).values() if isinstance(m, type) and issubclass(m, BaseModel)}
    for model in models:
        for name, field in model.model_fields.items():
            if field.annotation is float:
                assert not isinstance(field.default, int), f"{model.__name__}.{name}: default must be a float"


@pytest.mark.slow
@pytest.mark.ray
def test_worker_fault_resumes_from_last_checkpoint(ray_session, tmp_path, parents, monkeypatch):
    monkeypatch.setenv(hooks.FAIL_ONCE_AT_EPOCH_ENV, "1")  # forwarded to the workers by the driver
    cfg = _cfg(tmp_path, parents, num_workers=2, epochs=3, max_failures=1)
    outcome = run_mod.run_finetune(cfg)
    run_name = run_mod.check_finetune_inputs(cfg).identity(cfg).run_name(cfg)
    marker = tmp_path / "ray_results" / run_name / hooks.FAULT_MARKER
    assert marker.read_text().startswith("rank 1 epoch 1")  # the fault really happened, on rank 1
    _check_outcome(outcome, cfg, parents, 3)
    # the restarted group resumed at epoch 1 from the epoch-0 checkpoint, not from scratch
    assert [h["attempt_start_epoch"] for h in outcome.history] == [0, 1, 1]


def _weights(path) -> dict[str, torch.Tensor]:
    m = load_model(ModelConfig(source="checkpoint", name="t", path=str(path)), num_classes=10, input_shape=(1, 8, 8))
    return m.module.state_dict()


@pytest.mark.slow
@pytest.mark.ray
def test_one_and_two_workers_train_the_same_model(ray_session, tmp_path, parents):
    """batch_size is the global batch: 2 DDP workers take the same steps on the same samples with the same x*
    as 1 worker, so a mean-decomposable loss (PCAT) ends at the same weights up to float rounding. 1097
    digits at batch 64 leave a last global batch of 9, split 5 + 4: the share weighting is exercised too."""
    loss = {"kind": "pcat", "alpha": 1.0, "beta": 2.0}
    one = run_mod.run_finetune(
        _cfg(tmp_path / "one", parents, loss=loss, num_workers=0, name="one-worker", validation={"samples": 50})
    )
    two = run_mod.run_finetune(
        _cfg(tmp_path / "two", parents, loss=loss, num_workers=2, name="two-workers", validation={"samples": 50})
    )
    w1, w2, start = _weights(one.checkpoint), _weights(two.checkpoint), _weights(parents["new"])
    for key in w1:
        assert not torch.allclose(w1[key], start[key], atol=1e-4), f"{key} did not train"
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)
    for h1, h2 in zip(one.history, two.history, strict=True):
        assert (h1["world_size"], h2["world_size"]) == (1, 2)
        assert h1["global_batch_size"] == h2["global_batch_size"] == 64
        assert h1["train_samples"] == h2["train_samples"] == 1097  # the loss of the whole epoch, all workers
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)


def _old_table_on_train(tmp_path, parents, **attack) -> str:
    """Evaluate the old model on the digits training split into a store; returns the table's key."""
    from rcat_ray.config import AttackConfig, DataConfig, EvaluationSettings
    from rcat_ray.core.data import load_split
    from rcat_ray.evaluate.plan import EvaluationPlan, assemble, run_chunk
    from rcat_ray.store.result_store import ResultStore

    store = ResultStore(tmp_path / "store")
    split = load_split(DataConfig(name="digits", split="train"))
    old = load_model(
        ModelConfig(source="checkpoint", name="o", path=str(parents["old"])), num_classes=10, input_shape=(1, 8, 8)
    )
    attack_cfg = AttackConfig(eps=0.1, n_iter=3, **attack)
    plan = EvaluationPlan(old, split, attack_cfg, chunk_size=600)
    for c in plan.chunks():
        run_chunk(plan, c, store, device=torch.device("cpu"), keep_adversarial=False)
    settings = EvaluationSettings(data=DataConfig(name="digits", split="train"), attack=attack_cfg, chunk_size=600)
    assemble(plan, store, settings)
    return plan.key


def test_cached_masks_from_a_stored_table(tmp_path, parents):
    """mask_source 'cached': the old model's robustness flags come from its per-model table."""
    cfg = _cfg(
        tmp_path,
        parents,
        epochs=1,
        store=str(tmp_path / "store"),
        cached_old_table=_old_table_on_train(tmp_path, parents),
        loss={"kind": "rcat", "alpha": 0.3, "beta": 0.6, "mask_source": "cached"},
    )
    _check_outcome(run_mod.run_finetune(cfg), cfg, parents, 1)


def test_cached_masks_refuse_a_table_with_unattacked_training_samples(tmp_path, parents, no_training):
    """A null robust flag means "never attacked", not "not robust": such a table is refused before training,
    with the count of training samples it does not cover, instead of silently masking them out."""
    from rcat_ray.errors import FinetuneInputError

    key = _old_table_on_train(tmp_path, parents, robust_samples=200)  # 1097 - 200 samples never attacked
    cfg = _cfg(
        tmp_path,
        parents,
        epochs=1,
        store=str(tmp_path / "store"),
        cached_old_table=key,
        loss={"kind": "rcat", "alpha": 0.3, "beta": 0.6, "mask_source": "cached"},
    )
    with pytest.raises(FinetuneInputError, match=r"897 of the 1097 training samples were never attacked"):
        run_mod.check_finetune_inputs(cfg)
    with pytest.raises(FinetuneInputError, match=r"897 of the 1097"):
        run_mod.run_finetune(cfg)  # the TorchTrainer is never built (no_training)
    # a table that covers the training samples but not all of the file is fine: only training samples count
    head = _cfg(
        tmp_path,
        parents,
        data={"name": "digits", "split": "train", "limit": 200},
        epochs=1,
        store=str(tmp_path / "store"),
        cached_old_table=key,
        loss={"kind": "rcat", "alpha": 0.3, "beta": 0.6, "mask_source": "cached"},
    )
    run_mod.check_finetune_inputs(head)


def test_cached_mask_lookup_and_check():
    from rcat_ray.core.finetune_epoch import CachedMask
    from rcat_ray.errors import FinetuneInputError

    mask = CachedMask(torch.tensor([0, 1, 2, 5]), torch.tensor([1, 0, -1, 1]))
    assert mask(torch.tensor([5, 0, 1])).tolist() == [True, True, False]
    mask.check(torch.tensor([0, 1, 5]))
    with pytest.raises(
        FinetuneInputError, match=r"1 of the 4 training samples were never attacked.*2 of the 4 .*not in"
    ):
        mask.check(torch.tensor([0, 2, 3, 9]))
    with pytest.raises(FinetuneInputError):
        mask(torch.tensor([2]))


def test_global_batches_split_the_one_worker_batches():
    """Each rank's shares, concatenated over the ranks, are the 1-worker global batches (same order, same
    random-start rows), and every rank takes the same number of steps."""
    from rcat_ray.core.finetune_epoch import GlobalBatches, GlobalBatchSampler, global_batch_start

    n, batch = 203, 16  # last global batch: 11 -> shares 4, 4, 3 on 3 workers
    images, labels, ids = torch.rand(n, 1, 2, 2), torch.arange(n) % 10, torch.arange(n) + 1000

    def epoch(world, rank, e):
        sampler = GlobalBatchSampler(n, batch, rank=rank, world_size=world, seed=7)
        sampler.set_epoch(e)
        return list(GlobalBatches(sampler, images, labels, ids))

    for e in (0, 1):
        single = epoch(1, 0, e)
        assert len(single) == 13 and sorted(torch.cat([b.ids for b in single]).tolist()) == ids.tolist()
        for world in (2, 3):
            per_rank = [epoch(world, r, e) for r in range(world)]
            assert {len(p) for p in per_rank} == {len(single)}
            for i, whole in enumerate(single):
                shares = [p[i] for p in per_rank]
                assert torch.equal(torch.cat([b.ids for b in shares]), whole.ids)
                assert torch.equal(torch.cat([b.x for b in shares]), whole.x)
                assert torch.equal(
                    torch.cat([global_batch_start(b, 0.1) for b in shares]), global_batch_start(whole, 0.1)
                )
                assert sum(b.loss_weight for b in shares) == pytest.approx(world)
    assert not torch.equal(epoch(1, 0, 0)[0].ids, epoch(1, 0, 1)[0].ids), "every epoch has its own order"
    # a last global batch smaller than the worker count is dropped (no empty share), never with one worker
    assert len(GlobalBatchSampler(17, 8, world_size=2)) == 2
    assert len(GlobalBatchSampler(17, 8, world_size=1)) == 3


def test_finetune_epoch_attacks_in_full_precision_under_autocast(digits_models, digits_train):
    """With mixed precision the training forward runs under autocast (16-bit logits) but x* is crafted in
    float32 (the attack's forwards, in eval mode, give float32 logits)."""
    import copy

    from rcat_ray.config import LossConfig, TrainAttackConfig
    from rcat_ray.core.finetune_epoch import GlobalBatches, GlobalBatchSampler, finetune_epoch, frozen_copy

    old, new = digits_models
    model = copy.deepcopy(new.module).train()
    seen: set[tuple[bool, torch.dtype]] = set()
    model[-1].register_forward_hook(lambda mod, inp, out: seen.add((mod.training, out.dtype)))
    sampler = GlobalBatchSampler(256, 64)
    batches = GlobalBatches(
        sampler, digits_train.images[:256], digits_train.labels[:256], digits_train.sample_ids[:256]
    )
    stats = finetune_epoch(
        model,
        None,
        frozen_copy(old.module),
        batches,
        torch.optim.SGD(model.parameters(), lr=0.01),
        LossConfig(kind="at"),
        TrainAttackConfig(kind="fgsm-rs", eps=0.1),
        device=torch.device("cpu"),
        amp_dtype=torch.bfloat16,
    )
    assert seen == {(False, torch.float32), (True, torch.bfloat16)}
    assert stats["train_samples"] == 256 and stats["train_loss"] > 0


@pytest.fixture
def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started on a bad config")

    monkeypatch.setattr(train_mod, "_Trainer", boom)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--alpha", "0.8", "--beta", "0.3"], "alpha + beta <= 1"),
        (["--train-eps", "-0.1"], "train_attack.eps"),
        # argparse refuses a value outside the flag's choices itself: exit 2, naming the flag and the choices
        (
            ["--loss", "rcatt"],
            ("argument --loss", "invalid choice: 'rcatt'", "(choose from 'rcat', 'pct', 'pcat', 'at')"),
        ),
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
    try:
        status = main([*argv, *flags])
    except SystemExit as exit_:  # argparse's own refusal (before any config is built)
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    for part in (message,) if isinstance(message, str) else message:
        assert part in err, (part, err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
