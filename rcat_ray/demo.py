"""The embedded default (``make demo``): a real model update on Fashion-MNIST, evaluated and compared.

Old model: an MLP, new model: a small CNN, both adversarially trained with FGSM-RS (DESIGN §4). Both are
then attacked once each on Ray (APGD-CE + APGD-DLR) and compared into flip statistics and a report.
Trained models are cached by a hash of their training recipe, so a second run skips training.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import Field

from rcat_ray.config import (
    AttackConfig,
    BootstrapConfig,
    CompareConfig,
    ComputeConfig,
    DataConfig,
    ModelConfig,
    _Strict,
    stable_hash,
)
from rcat_ray.core.data import load_split
from rcat_ray.core.models import build_architecture, save_checkpoint
from rcat_ray.core.training import adversarial_train


class TrainRecipe(_Strict):
    """How one demo model is trained (its hash names the cached checkpoint)."""

    arch: str
    arch_kwargs: dict = Field(default_factory=dict)
    epochs: int = Field(..., ge=1)
    train_samples: int = Field(..., ge=1, description="the first N images of the train split")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    eps: float = Field(0.1, gt=0, le=1)
    seed: int = 0


class DemoConfig(_Strict):
    """The demo's settings; every key can be overridden from a YAML file (``rcat-ray demo --config``)."""

    out: str = "demo-out"
    data_root: str | None = None
    old: TrainRecipe = TrainRecipe(arch="mlp", epochs=10, train_samples=25_000, seed=0)
    new: TrainRecipe = TrainRecipe(arch="small_cnn", epochs=8, train_samples=50_000, seed=1)
    test_samples: int = Field(5000, ge=1)
    attack: AttackConfig = AttackConfig(eps=0.1, attacks=("apgd-ce", "apgd-dlr"), n_iter=50)
    chunk_size: int = Field(250, ge=1)
    compute: ComputeConfig = ComputeConfig(num_workers=2, cpus_per_worker=1.0, threads_per_worker=1)
    bootstrap: BootstrapConfig = BootstrapConfig()
    train_threads: int = Field(2, ge=1, description="torch threads for training in the driver")


def train_or_load(recipe: TrainRecipe, models_dir: Path, data_root: str | None, name: str) -> Path:
    """The checkpoint of a recipe: trained once, then reused from ``models_dir``."""
    path = models_dir / f"{name}-{recipe.arch}-{stable_hash(recipe)}.pt"
    if path.is_file():
        print(f"[demo] {name}: reusing {path}")
        return path
    split = load_split(DataConfig(name="fashion_mnist", root=data_root, split="train", limit=recipe.train_samples))
    torch.manual_seed(recipe.seed)
    model = build_architecture(
        recipe.arch, num_classes=split.num_classes, input_shape=split.input_shape, **recipe.arch_kwargs
    )
    t0 = time.perf_counter()
    losses = adversarial_train(
        model, split.images, split.labels, epochs=recipe.epochs, eps=recipe.eps,
        batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, desc=name,
    )  # fmt: skip
    print(f"[demo] {name}: trained {recipe.arch} in {time.perf_counter() - t0:.0f} s (final loss {losses[-1]:.3f})")
    save_checkpoint(
        path, model, arch=recipe.arch, num_classes=split.num_classes, input_shape=split.input_shape,
        arch_kwargs=recipe.arch_kwargs, metadata={"recipe": recipe.model_dump(), "losses": losses},
    )  # fmt: skip
    return path


def run_demo(cfg: DemoConfig) -> None:
    """Train (or reuse) old and new, compare them on Ray, print the summary and write the report."""
    from rcat_ray.core.flips import format_summary
    from rcat_ray.report import write_report
    from rcat_ray.workflows import run_compare

    torch.set_num_threads(cfg.train_threads)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    old_path = train_or_load(cfg.old, out / "models", cfg.data_root, "old")
    new_path = train_or_load(cfg.new, out / "models", cfg.data_root, "new")
    t_train = time.perf_counter() - t0
    compare = CompareConfig(
        data=DataConfig(name="fashion_mnist", root=cfg.data_root, split="test", limit=cfg.test_samples),
        attack=cfg.attack,
        chunk_size=cfg.chunk_size,
        store=str(out / "store"),
        compute=cfg.compute,
        old=ModelConfig(source="checkpoint", name="old", label="old (MLP)", path=str(old_path)),
        new=ModelConfig(source="checkpoint", name="new", label="new (CNN)", path=str(new_path)),
        bootstrap=cfg.bootstrap,
    )
    t1 = time.perf_counter()
    outcomes, comparison, prepared = run_compare(compare)
    t_eval = time.perf_counter() - t1
    for o in outcomes:
        print(f"[demo] {o.describe()}")
    assert comparison is not None  # no chunk budget in the demo: both evaluations complete
    print(format_summary(comparison.summary))
    report = write_report(prepared.store, comparison.key, out / "report")
    print(f"[demo] training {t_train:.0f} s, evaluation {t_eval:.0f} s, total {time.perf_counter() - t0:.0f} s")
    print(f"[demo] report: {report}")
