"""Loading models from their sources (local checkpoints, RobustBench, built-in architectures), with fingerprints.

Every loaded model carries a fingerprint, a hash of its weights: it keys the evaluation cache, so a
retrained or fine-tuned model never reuses a stale table, and an unchanged one is never attacked twice.
Checkpoints are read with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is
refused, never executed.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcat_ray.config import ModelConfig
from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.core.models.architectures import _ARCHITECTURES, build_architecture
from rcat_ray.errors import ModelError

CHECKPOINT_FORMAT = "rcat_ray.checkpoint/1"


def fingerprint_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes), independent of device."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint_module(module: nn.Module) -> str:
    """Fingerprint of a module's weights."""
    return fingerprint_state_dict(module.state_dict())


@dataclass
class LoadedModel:
    """A model ready to evaluate: in eval mode, on the CPU, with its identity."""

    name: str
    module: nn.Module
    fingerprint: str
    num_classes: int
    source: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the model."""
        return {"name": self.name, "fingerprint": self.fingerprint, "num_classes": self.num_classes, **self.source}


def _robustbench_architecture(name: str) -> nn.Module:
    """An untrained RobustBench zoo architecture, named ``robustbench/<dataset>/<threat_model>/<model>``.

    Lets a fine-tuned RobustBench model be saved as a self-describing checkpoint and loaded back.
    """
    parts = name.split("/")
    if len(parts) != 4:
        raise ModelError(f"RobustBench architecture names look like robustbench/cifar10/Linf/<model>, got '{name}'")
    _, dataset, threat, model_name = parts
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][model_name]["model"]()
    except (KeyError, ValueError):
        raise ModelError(f"unknown RobustBench architecture '{name}'") from None


def from_module(module: nn.Module, *, name: str, num_classes: int, source: dict | None = None) -> LoadedModel:
    """Wrap an in-memory module (the Python API's entry for models trained in the same process)."""
    module = module.to("cpu").eval()
    return LoadedModel(
        name=name,
        module=module,
        fingerprint=fingerprint_module(module),
        num_classes=num_classes,
        source=source or {"source": "in-memory"},
    )


def save_checkpoint(
    path: str | Path,
    module: nn.Module,
    *,
    arch: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    arch_kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Write a self-describing checkpoint (loadable with weights_only=True) atomically; returns its fingerprint."""
    path = Path(path)
    state = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
    blob = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        "metadata": dict(metadata or {}),
        "state_dict": state,
    }
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    write_file_atomic(path, buffer.getvalue())
    return fingerprint_state_dict(state)


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A self-describing checkpoint's metadata, with the fingerprint of the weights it holds."""
    path = Path(path)
    blob = _read_checkpoint(path)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a self-describing rcat_ray checkpoint")
    return {**dict(blob.get("metadata") or {}), "fingerprint": fingerprint_state_dict(_state_dict_of(blob, path))}


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, which would run whatever the file holds: never shown.
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "allowlist" in text or "reduce" in text.lower():
            what = f" ({found.group(1)})" if found else ""
            raise ModelError(
                f"refusing checkpoint {path}: it holds pickled Python objects{what} that could run "
                "code when loaded; only tensors are read. Save the model's state_dict instead "
                "(torch.save(model.state_dict(), path))."
            ) from None
        raise ModelError(f"{path} is not a readable PyTorch checkpoint (damaged, or not a checkpoint)") from None
    except Exception:  # noqa: BLE001 - zip/EOF/format errors all mean the same to the user
        raise ModelError(
            f"{path} is not a readable PyTorch checkpoint (truncated, damaged, or not a checkpoint)"
        ) from None


def _state_dict_of(blob: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(blob, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
        if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
            return {k.removeprefix("module."): v for k, v in blob.items()}
    raise ModelError(f"checkpoint {path} holds no state_dict (a mapping of parameter names to tensors)")


def check_model_source(cfg: ModelConfig, *, data_name: str | None = None) -> None:
    """Cheap checks of a model source (file present, name known) to run before any data is loaded."""
    if cfg.source == "builtin":
        if cfg.name not in _ARCHITECTURES:
            build_architecture(cfg.name, num_classes=1, input_shape=(1, 1, 1))  # raises with a suggestion
    elif cfg.source == "checkpoint":
        if not Path(cfg.path or "").expanduser().is_file():
            raise ModelError(f"checkpoint not found: {cfg.path}")
    else:
        robustbench_checkpoint_path(
            cfg.name,
            model_dir=Path(cfg.model_dir).expanduser(),
            dataset=cfg.dataset or _RB_DATASETS.get(data_name or "", "cifar10"),
            threat_model=cfg.threat_model or "Linf",
        )


def load_model(
    cfg: ModelConfig, *, num_classes: int, input_shape: tuple[int, int, int], data_name: str | None = None
) -> LoadedModel:
    """Load a model from its source; the data's class count and shape fill what the source leaves open."""
    if cfg.source == "builtin":
        torch.manual_seed(cfg.seed)
        module = build_architecture(cfg.name, num_classes=num_classes, input_shape=input_shape, **cfg.arch_kwargs)
        return from_module(
            module,
            name=cfg.display_name,
            num_classes=num_classes,
            source={"source": "builtin", "arch": cfg.name, "arch_kwargs": dict(cfg.arch_kwargs), "seed": cfg.seed},
        )
    if cfg.source == "checkpoint":
        return _load_checkpoint_model(cfg, num_classes=num_classes, input_shape=input_shape)
    return _load_robustbench(cfg, data_name=data_name)


def _load_checkpoint_model(cfg: ModelConfig, *, num_classes: int, input_shape: tuple[int, int, int]) -> LoadedModel:
    path = Path(cfg.path or "").expanduser()
    blob = _read_checkpoint(path)
    state = _state_dict_of(blob, path)
    described = isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT
    arch = cfg.arch or (blob.get("arch") if described else None)
    if not arch:
        raise ModelError(f"checkpoint {path} does not name its architecture: set 'arch' in the model config")
    kwargs = dict(blob.get("arch_kwargs", {})) if described else {}
    kwargs.update(cfg.arch_kwargs)
    ck_classes = int(blob.get("num_classes", num_classes)) if described else num_classes
    ck_shape = tuple(blob.get("input_shape", input_shape)) if described else tuple(input_shape)
    module = build_architecture(arch, num_classes=ck_classes, input_shape=ck_shape, **kwargs)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"checkpoint {path} does not fit architecture '{arch}': {err}") from None
    return LoadedModel(
        name=cfg.display_name,
        module=module.eval(),
        fingerprint=fingerprint_state_dict(state),
        num_classes=ck_classes,
        source={
            "source": "checkpoint",
            "path": str(path.resolve()),
            "arch": arch,
            "arch_kwargs": kwargs,
            "metadata": blob.get("metadata", {}) if described else {},
        },
    )


def register_autoattack_alias() -> None:
    """robustbench 1.1.1 imports ``autoattack``, which PyPI ships as ``pyautoattack``: alias it.

    Needed before importing robustbench, and before unpickling a RobustBench model in a Ray worker.
    """
    import pyautoattack
    import pyautoattack.state

    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)


def import_robustbench() -> Any:
    """Import robustbench with the ``autoattack`` alias in place."""
    register_autoattack_alias()
    import robustbench.utils

    return robustbench


_RB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}


def _load_robustbench(cfg: ModelConfig, *, data_name: str | None) -> LoadedModel:
    dataset = cfg.dataset or _RB_DATASETS.get(data_name or "", "cifar10")
    threat = cfg.threat_model or "Linf"
    model_dir = Path(cfg.model_dir).expanduser()
    path = robustbench_checkpoint_path(cfg.name, model_dir=model_dir, dataset=dataset, threat_model=threat)
    rb = import_robustbench()
    module = rb.utils.load_model(model_name=cfg.name, model_dir=str(model_dir), dataset=dataset, threat_model=threat)
    module = module.to("cpu").eval()
    n_classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[dataset]
    return LoadedModel(
        name=cfg.display_name,
        module=module,
        fingerprint=fingerprint_module(module),
        num_classes=n_classes,
        source={
            "source": "robustbench",
            "robustbench_name": cfg.name,
            "dataset": dataset,
            "threat_model": threat,
            "path": str(path.resolve()),
            "arch": f"robustbench/{dataset}/{threat}/{cfg.name}",
        },
    )


def robustbench_checkpoint_path(name: str, *, model_dir: Path, dataset: str, threat_model: str) -> Path:
    """Check a RobustBench name against the zoo and that its weights are on disk (nothing is downloaded).

    Returns the file ``load_model`` will read: ``model_dir/<dataset>/<threat_model>/<name>.pt``.
    """
    rb = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (ValueError, KeyError):
        raise ModelError(
            f"RobustBench has no models for dataset '{dataset}' and threat model '{threat_model}'"
        ) from None
    if name not in zoo:
        hint = difflib.get_close_matches(name, list(zoo), n=3)
        extra = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise ModelError(f"unknown RobustBench model '{name}' for {dataset}/{threat_model}{extra}")
    if isinstance(zoo[name].get("gdrive_id"), list):
        raise ModelError(f"RobustBench model '{name}' is an ensemble; ensembles are not supported")
    path = model_dir / dataset / threat_model / f"{name}.pt"
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    import timm

    if timm.is_model(timm_name):
        raise ModelError(
            f"RobustBench serves '{name}' through the timm hub ({timm_name}), which cannot be reached offline; "
            "use a local checkpoint source instead"
        )
    if not path.is_file():
        raise ModelError(
            f"RobustBench weights for '{name}' are not on disk and cannot be downloaded here: place the "
            f"checkpoint at {path} (RobustBench's model_dir layout <model_dir>/<dataset>/<threat_model>/<name>.pt)"
        )
    del rb
    return path
