"""Three digits models of two widths (trained for more steps: each better than the one before) and a small study
config over them: the study's tests run the real Tune sweeps, Ray Train fine-tunes and Ray Data evaluations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rcat_ray.config import ModelConfig
from rcat_ray.core.models import load_model, save_checkpoint
from tests.conftest import fit

#: name -> (hidden widths, training steps, seed)
MODELS = {"m0": ([16], 10, 0), "m1": ([32], 40, 1), "m2": ([64], 150, 2)}


@pytest.fixture(scope="session")
def study_checkpoints(tmp_path_factory, digits_train) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("study-models")
    paths = {}
    for name, (hidden, steps, seed) in MODELS.items():
        m = load_model(
            ModelConfig(source="builtin", name="mlp", seed=seed, arch_kwargs={"hidden": hidden}),
            num_classes=10,
            input_shape=digits_train.input_shape,
        )
        with torch.random.fork_rng():
            fit(m.module, digits_train, steps, seed)
        paths[name] = folder / f"{name}.pt"
        shape = {"num_classes": 10, "input_shape": (1, 8, 8)}
        save_checkpoint(paths[name], m.module, arch="mlp", arch_kwargs={"hidden": hidden}, **shape)
    return paths


@pytest.fixture
def study_raw(tmp_path, study_checkpoints):
    """A small study: the paper's rule over the three models, AT and one RCAT point, two seeds."""

    def make(**over) -> dict:
        raw = {
            "name": "digits-study",
            "models": {n: {"source": "checkpoint", "path": str(p)} for n, p in study_checkpoints.items()},
            "pairs": "paper-rule",
            "methods": ["at", "rcat"],
            "rcat_grid": [[0.5, 0.4]],
            "seeds": [0, 1],
            "finetune": {
                "data": {"name": "digits", "split": "train", "limit": 256},
                "train_attack": {"eps": 0.1},
                "optimizer": {"lr": 0.01},
                "epochs": 1,
                "batch_size": 64,
                "validation": {"samples": 50, "attack": {"eps": 0.1, "attacks": ["apgd-ce"], "n_iter": 2}},
                "compute": {"num_workers": 0, "threads_per_worker": 1},
            },
            "choice": {"samples": 100, "chunk_size": 50, "attack": {"eps": 0.1, "attacks": ["apgd-ce"], "n_iter": 3}},
            "tolerance": 0.1,
            "test": {
                "data": {"name": "digits", "split": "test", "limit": 120},
                "attack": {"eps": 0.1, "attacks": ["apgd-ce"], "n_iter": 3},
                "chunk_size": 60,
            },
            "compute": {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 1},
            "store": str(tmp_path / "store"),
            "storage": str(tmp_path / "ray_results"),
            "out": str(tmp_path / "out"),
            "bootstrap": {"n_resamples": 200},
        }
        raw.update(over)
        return raw

    return make


@pytest.fixture
def study_yaml(tmp_path, study_raw):
    def make(**over) -> Path:
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(study_raw(**over)))
        return path

    return make
