"""The digits fine-tune the finetune tests start from: one config, each test file with its own defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcat_ray.config import parse_config
from rcat_ray.finetune.config import FinetuneConfig

#: Keyword arguments that set the ``compute`` section rather than a top-level key.
COMPUTE_KEYS = ("num_workers", "cpus_per_worker", "gpus_per_worker", "threads_per_worker", "address")


def digits_finetune(
    tmp_path: Path,
    parents: dict[str, Path],
    *,
    loss: dict[str, Any] | None = None,
    epochs: int = 2,
    validation_samples: int = 50,
    **kw: Any,
) -> FinetuneConfig:
    """A 0-worker RCAT(0.5, 0.4) fine-tune of the digits checkpoints; ``kw`` overrides keys (compute keys too)."""
    raw: dict[str, Any] = {
        "old": {"source": "checkpoint", "name": "old", "path": str(parents["old"])},
        "new": {"source": "checkpoint", "name": "new", "path": str(parents["new"])},
        "data": {"name": "digits", "split": "train"},
        "loss": loss or {"kind": "rcat", "alpha": 0.5, "beta": 0.4},
        "train_attack": {"kind": "fgsm-rs", "eps": 0.1},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "epochs": epochs,
        "batch_size": 64,
        "validation": {"samples": validation_samples},
        "out": str(tmp_path / "out"),
        "storage": str(tmp_path / "ray_results"),
        "store": str(tmp_path / "store"),  # the prepared training and validation sets live here
        "compute": {"num_workers": 0, "threads_per_worker": 1},
    }
    for key, value in kw.items():
        (raw["compute"] if key in COMPUTE_KEYS else raw)[key] = value
    return parse_config(FinetuneConfig, raw)
