"""Pretraining from scratch (the demo's old and new models): the one-cycle schedule, the constant one,
progress lines, and the recipe that names the cached checkpoints."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from rcat_ray.config import parse_config
from rcat_ray.core.models import build_architecture
from rcat_ray.core.training import adversarial_train, make_schedule
from rcat_ray.core.training_attacks import fgsm_rs
from rcat_ray.errors import ConfigError
from rcat_ray.finetune.pretrain import TrainRecipe


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_architecture("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=(32,))


def test_onecycle_warms_up_to_the_maximum_then_anneals_to_about_zero():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = make_schedule(opt, "onecycle", max_lr=2e-3, total_steps=200, warmup=0.15)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = max(range(200), key=lrs.__getitem__)
    assert lrs[0] == pytest.approx(2e-3 / 25)
    assert lrs[peak] == pytest.approx(2e-3, rel=1e-3) and abs(peak - 30) <= 1  # 15% of 200 steps
    assert lrs[-1] < 2e-3 * 1e-3  # annealed to about 0: a converged model at the end
    assert make_schedule(opt, "constant", max_lr=2e-3, total_steps=200, warmup=0.15) is None
    with pytest.raises(ValueError, match="warmup"):
        make_schedule(opt, "onecycle", max_lr=2e-3, total_steps=200, warmup=1.5)


def test_constant_schedule_is_the_previous_training(digits_train):
    """``schedule: constant`` trains exactly as before the schedule option existed (Adam at a fixed lr)."""
    x, y = digits_train.images[:300], digits_train.labels[:300]
    model = _mlp()
    adversarial_train(model, x, y, epochs=2, eps=0.1, batch_size=64, lr=1e-3, schedule="constant", seed=3)

    ref = _mlp()  # the loop as it was: no scheduler
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    order, attack = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    ref.train()
    for _ in range(2):
        perm = torch.randperm(300, generator=order)
        for start in range(0, 300, 64):
            idx = perm[start : start + 64]
            loss = F.cross_entropy(ref(fgsm_rs(ref, x[idx], y[idx], 0.1, generator=attack)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_onecycle_training_logs_progress_lines(digits_train, caplog):
    """Progress goes to the rcat_ray.core.progress logger as plain lines (done/total batches, ETA), plus one line
    per finished epoch, so a piped log shows how far training is."""
    x, y = digits_train.images[:512], digits_train.labels[:512]
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.INFO, logger="rcat_ray.core.progress"):
        losses = adversarial_train(model, x, y, epochs=2, eps=0.1, batch_size=128, lr=2e-3, desc="old", interval_s=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "rcat_ray.core.progress"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert any(line.startswith("[train old] 3/8 batches") and "ETA" in line for line in lines)
    assert any(line.startswith("[train old] 8/8 batches (100%)") for line in lines)
    assert [line.split(":")[0] for line in lines if "done" in line] == [
        "[train old] epoch 1/2 done",
        "[train old] epoch 2/2 done",
    ]
    assert not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    caplog.clear()
    adversarial_train(_mlp(), x, y, epochs=1, eps=0.1, progress=False)
    assert not [r for r in caplog.records if r.name == "rcat_ray.core.progress"]


def test_recipe_defaults_are_the_measured_recipe_and_validated():
    recipe = TrainRecipe(arch="mlp", epochs=1)
    assert (recipe.schedule, recipe.warmup, recipe.lr, recipe.batch_size) == ("onecycle", 0.15, 2e-3, 128)
    assert parse_config(TrainRecipe, {"arch": "mlp", "epochs": 1, "schedule": "constant"}).schedule == "constant"
    with pytest.raises(ConfigError, match="schedule"):
        parse_config(TrainRecipe, {"arch": "mlp", "epochs": 1, "schedule": "cosine"})
    with pytest.raises(ConfigError, match="warmup"):
        parse_config(TrainRecipe, {"arch": "mlp", "epochs": 1, "warmup": 1.0})


def test_the_demo_recipes_are_the_specified_ones():
    """The demo's pretraining recipes and global batch, as the README describes them."""
    from rcat_ray.demo import DemoConfig

    defaults = DemoConfig()
    assert defaults.old.epochs == 10 and defaults.old.train_samples == 25_000 and defaults.old.arch == "mlp"
    assert defaults.new.epochs == 8 and defaults.new.train_samples == 50_000 and defaults.new.arch == "small_cnn"
    for recipe in (defaults.old, defaults.new):
        assert (recipe.lr, recipe.schedule, recipe.batch_size, recipe.eps) == (2e-3, "onecycle", 128, 0.1)
    assert defaults.finetune_batch_size == 128  # the global batch
