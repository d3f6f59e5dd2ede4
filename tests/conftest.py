"""Shared fixtures: one real local Ray session for the whole test run, small trained models, data.

The environment variables must be set before ``import ray`` anywhere (docs/architecture.md, "Ray facts the code
relies on", 1 and 2).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind Ray to 127.0.0.1 only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rcat_ray.config import DataConfig, ModelConfig
from rcat_ray.core.data import Split, load_split
from rcat_ray.core.models import LoadedModel, from_module, load_model


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance with 2 CPUs, shared by every test that needs Ray."""
    import ray

    # a failed evaluation must give its actors' CPUs back (tests/evaluate/test_evaluate_ray.py checks it): with only 2,
    # an actor left behind would starve the 2-worker Ray Train tests that follow in this one session
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_train() -> Split:
    return load_split(DataConfig(name="digits", split="train"))


def fit(model: torch.nn.Module, split: Split, steps: int, seed: int) -> torch.nn.Module:
    """A few full-batch Adam steps: enough for digits models that differ and classify well."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(split.images), split.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_models(digits_train: Split) -> tuple[LoadedModel, LoadedModel]:
    """Two small MLPs trained on digits for a different number of steps: an 'old' and a 'new' model."""
    shape = digits_train.input_shape
    old = load_model(
        ModelConfig(source="builtin", name="mlp", seed=0, arch_kwargs={"hidden": [32]}),
        num_classes=10,
        input_shape=shape,
    )
    new = load_model(
        ModelConfig(source="builtin", name="mlp", seed=1, arch_kwargs={"hidden": [64]}),
        num_classes=10,
        input_shape=shape,
    )
    with torch.random.fork_rng():
        fit(old.module, digits_train, 40, 0)
        fit(new.module, digits_train, 150, 1)
    return (
        from_module(old.module, name="old", num_classes=10),
        from_module(new.module, name="new", num_classes=10),
    )


@pytest.fixture
def digits_checkpoints(tmp_path, digits_models) -> dict[str, Path]:
    """The two digits models as self-describing checkpoints (the form every model source reads)."""
    from rcat_ray.core.models import save_checkpoint

    paths = {}
    for name, m in zip(("old", "new"), digits_models, strict=True):
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint(
            paths[name],
            m.module,
            arch="mlp",
            num_classes=10,
            input_shape=(1, 8, 8),
            arch_kwargs={"hidden": [m.module[1].out_features]},
        )
    return paths


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below a folder with its content: to assert a store was left untouched."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_compute(monkeypatch):
    """Any attempt to start Ray or attack a chunk fails the test (bad input must be refused before either)."""
    from rcat_ray.evaluate import worker
    from rcat_ray.runtime import cluster

    def boom(*a, **k):
        raise AssertionError("compute started on bad input")

    monkeypatch.setattr(cluster, "ensure_ray", boom)
    monkeypatch.setattr(worker, "evaluate_chunk", boom)
