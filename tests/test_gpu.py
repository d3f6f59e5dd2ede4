"""The CUDA paths: what only a GPU exercises (float16 autocast with grad scaling, attacks on the device).

Each test skips cleanly where torch sees no CUDA device, so the suite passes on a CPU machine; run them on a
GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

from rcat_ray.config import AttackConfig, DataConfig, TrainAttackConfig, parse_config
from rcat_ray.core.attacks import evaluate_chunk
from rcat_ray.core.data import load_split
from rcat_ray.finetune.config import FinetuneConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

EPS = 0.1


@pytest.fixture
def cuda() -> torch.device:
    return torch.device("cuda")


def test_training_attack_under_float16_autocast_takes_its_gradient_step(digits_models, digits_train, cuda):
    """On a GPU, float16 autocast makes the input gradient of a confident model underflow to exactly 0; the
    training attack runs in float32, so x* moves beyond its random start wherever it does in float32."""
    from rcat_ray.core.finetune_epoch import craft

    model = copy.deepcopy(digits_models[1].module).to(cuda).eval()
    with torch.no_grad():  # confident: other classes' probabilities below float16's range, not float32's
        model[-1].weight.mul_(4)
        model[-1].bias.mul_(4)
    x, y = digits_train.images[:256].to(cuda), digits_train.labels[:256].to(cuda)
    cfg = TrainAttackConfig(kind="fgsm-rs", eps=EPS)
    fp32 = craft(model, x, y, cfg, torch.Generator().manual_seed(5))
    with torch.autocast("cuda", dtype=torch.float16):
        amp = craft(model, x, y, cfg, torch.Generator().manual_seed(5))
    start = ((torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * EPS).to(cuda)
    x0 = (x + start).clamp(0, 1)
    moved_fp32 = (fp32 - x0).flatten(1).abs().amax(1) > 0
    moved_amp = (amp - x0).flatten(1).abs().amax(1) > 0
    assert amp.dtype == torch.float32
    assert moved_fp32.float().mean() > 0.95
    assert torch.equal(moved_amp, moved_fp32)
    torch.testing.assert_close(amp, fp32)


class _CudaSession:
    """The loop's view of one process on one GPU (what Ray Train's session gives a GPU worker)."""

    rank, world = 0, 1
    persistent_checkpoints = False

    def __init__(self) -> None:
        self.device = torch.device("cuda")
        self.reports: list[dict[str, Any]] = []
        self.seen: set[tuple[bool, torch.dtype]] = set()

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        module[-1].register_forward_hook(lambda mod, inp, out: self.seen.add((mod.training, out.dtype)))
        return module.to(self.device)

    def get_checkpoint(self) -> None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))


def test_one_finetuning_epoch_on_cuda_with_mixed_precision(tmp_path, digits_checkpoints):
    """The fine-tuning loop on the GPU: the training forward in float16 (GradScaler), x* in float32."""
    from rcat_ray.finetune.ray_train import finetune_loop

    cfg = parse_config(
        FinetuneConfig,
        {
            "old": {"source": "checkpoint", "name": "old", "path": str(digits_checkpoints["old"])},
            "new": {"source": "checkpoint", "name": "new", "path": str(digits_checkpoints["new"])},
            "data": {"name": "digits", "split": "train"},
            "loss": {"kind": "rcat", "alpha": 0.5, "beta": 0.4},
            "train_attack": {"kind": "fgsm-rs", "eps": EPS},
            "epochs": 1,
            "batch_size": 64,
            "mixed_precision": True,
            "validation": {"samples": 100},
            "out": str(tmp_path / "out"),
            "storage": str(tmp_path / "ray_results"),
            "store": str(tmp_path / "store"),
            "compute": {"num_workers": 0, "gpus_per_worker": 1},
        },
    )
    session = _CudaSession()
    metrics = finetune_loop(cfg, session)
    assert session.seen == {(False, torch.float32), (True, torch.float16)}
    assert math.isfinite(metrics["train_loss"]) and metrics["train_samples"] == 1097
    assert (metrics["world_size"], metrics["global_batch_size"]) == (1, 64)
    assert 0 <= metrics["val_rob_acc"] <= metrics["val_acc"] <= 1


def test_one_evaluation_chunk_on_cuda(digits_models, cuda):
    """A chunk attacked on the GPU: robust implies clean-correct, and the same seed gives the same rows."""
    _, new = digits_models
    split = load_split(DataConfig(name="digits", split="test", limit=200))
    cfg = AttackConfig(eps=EPS, attacks=("apgd-ce", "apgd-dlr"), n_iter=20)

    def run():
        return evaluate_chunk(
            copy.deepcopy(new.module),
            split.images,
            split.labels,
            split.sample_ids,
            cfg,
            num_classes=10,
            seed=3,
            device=cuda,
            keep_adversarial=True,
        )

    a, b = run(), run()
    df = a.table.to_pandas()
    assert not (df.robust.astype(bool) & ~df.clean_correct).any()
    assert (~df.robust.astype(bool) & df.clean_correct).any(), "eps 0.1 must break some samples"
    assert (df.perturbation_linf <= EPS + 1e-6).all()
    assert a.table.equals(b.table)
    np.testing.assert_array_equal(a.adversarial, b.adversarial)
