"""Models by reference: what evaluation workers receive instead of weights (a source and a fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from rcat_ray.config import ModelConfig
from rcat_ray.core.models.loading import LoadedModel, fingerprint_module, load_model
from rcat_ray.errors import ModelError, ModelFingerprintError


@dataclass(frozen=True)
class ModelRef:
    """A model named by its source and the fingerprint its weights must have; small and picklable.

    Evaluation actors load each model themselves from ``config`` (a checkpoint path, a RobustBench name and
    model_dir, or a builtin architecture and seed: valid on every node when paths are on shared storage), so the
    driver never ships weights to every actor. The fingerprint the driver computed keys the stored results,
    so a worker that loads anything else (a checkpoint replaced during the run, another copy of the file on
    its node) refuses instead of filing rows under the wrong key. A model that exists only in memory (the
    Python API's :func:`from_module`) has no ``config``: its module rides along in ``module`` on the driver and
    the Ray layer sends it once through the object store.
    """

    name: str
    fingerprint: str
    num_classes: int
    source: dict[str, Any] = field(default_factory=dict)  # what manifests record (LoadedModel.source)
    config: dict[str, Any] | None = None  # ModelConfig as JSON; None: in memory only
    input_shape: tuple[int, int, int] | None = None  # what load_model fills in for builtins and plain checkpoints
    data_name: str | None = None  # picks a RobustBench dataset when the config names none
    module: nn.Module | None = field(default=None, repr=False, compare=False)  # in-memory models only

    @property
    def in_memory(self) -> bool:
        """Whether the weights exist nowhere but in the driver's process."""
        return self.config is None

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the model (the same as ``LoadedModel.describe``)."""
        return {"name": self.name, "fingerprint": self.fingerprint, "num_classes": self.num_classes, **self.source}

    def without_module(self) -> ModelRef:
        """The reference without weights: what travels to workers."""
        return replace(self, module=None)

    def where(self) -> str:
        """The source in words, for error messages."""
        if self.config is None:
            return "the driver's memory"
        c = self.config
        if c["source"] == "checkpoint":
            return f"checkpoint {c['path']}"
        if c["source"] == "robustbench":
            return f"RobustBench '{c['name']}' in {c['model_dir']}"
        return f"builtin '{c['name']}' (seed {c['seed']})"


def model_reference(
    model: LoadedModel,
    cfg: ModelConfig | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    data_name: str | None = None,
) -> ModelRef:
    """The reference of a model loaded from ``cfg`` (reloadable anywhere), or of an in-memory one (``cfg`` None:
    the reference keeps the module, to be sent once through the object store)."""
    if cfg is None:
        return ModelRef(model.name, model.fingerprint, model.num_classes, dict(model.source), module=model.module)
    return ModelRef(
        model.name,
        model.fingerprint,
        model.num_classes,
        dict(model.source),
        config=cfg.model_dump(mode="json"),
        input_shape=tuple(int(s) for s in input_shape) if input_shape is not None else None,
        data_name=data_name,
    )


def load_reference(ref: ModelRef) -> LoadedModel:
    """Load a referenced model (from its source, or its attached module) and check it has the planned weights."""
    if ref.config is None:
        if ref.module is None:
            raise ModelError(f"model '{ref.name}' exists only in the driver's memory and its weights were not sent")
        module = ref.module.to("cpu").eval()
        fingerprint = fingerprint_module(module)
    else:
        cfg = ModelConfig.model_validate(ref.config)
        loaded = load_model(
            cfg, num_classes=ref.num_classes, input_shape=ref.input_shape or (1, 1, 1), data_name=ref.data_name
        )
        module, fingerprint = loaded.module, loaded.fingerprint
    if fingerprint != ref.fingerprint:
        raise ModelFingerprintError(
            f"model '{ref.name}' loaded from {ref.where()} has weights with fingerprint {fingerprint}, but the run "
            f"was planned with {ref.fingerprint}: the source changed during the run (or this node sees another "
            "copy of it); nothing was stored for it. Make the source the same on every node and run again."
        )
    return LoadedModel(
        name=ref.name, module=module, fingerprint=fingerprint, num_classes=ref.num_classes, source=dict(ref.source)
    )
