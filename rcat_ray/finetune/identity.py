"""What a fine-tuned model is: a hash of everything that sets its weights, never its name or paths.

A fine-tune is reused (its checkpoint) or resumed (a Ray Train snapshot) only when its recorded identity equals
the request's. The identity covers both parents' weights (fingerprints, with their architectures), the
training set's content fingerprint, the cached old-model table (when RCAT reads its masks from one), and the
whole resolved training config without the fields that only say where things go or how the work is spread
(:data:`NOT_IN_IDENTITY`). Retraining a parent in place, changing a loss weight, or pointing a named run at
other data therefore gives another identity, and so another run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from rcat_ray.finetune.config import FinetuneConfig

#: Raised whenever the same inputs and settings train other weights than before, so that no earlier fine-tune or
#: snapshot is reused for them: 2 = the rows of a global batch are taken in storage order (workers read their share).
IDENTITY_VERSION = 2
#: FinetuneConfig fields that do not change the trained weights: outputs, labels, placement (the ``compute``
#: section), fault handling and the per-epoch validation (reported, never trained on). The parents and the data
#: enter as fingerprints. The worker count is left out because 1 and N workers train the same model (global
#: batches, global mask counts, global BatchNorm statistics); with ``batchnorm: per-worker`` it enters the identity.
NOT_IN_IDENTITY = frozenset(
    {
        "old",
        "new",
        "data",
        "cached_old_table",
        "validation",
        "out",
        "name",
        "output",
        "storage",
        "store",
        "compute",
        "max_failures",
    }
)


def model_identity(fingerprint: str, source: dict[str, Any]) -> dict[str, Any]:
    """What of a parent sets the child's weights: its weights and the architecture they fill (in JSON form, so
    that a tuple in the driver's config and the list a worker parses from it compare equal)."""
    described = {"fingerprint": fingerprint, "arch": source.get("arch"), "arch_kwargs": source.get("arch_kwargs") or {}}
    return json.loads(json.dumps(described, sort_keys=True, default=str))


@dataclass(frozen=True)
class IdentityInputs:
    """The fingerprints a fine-tune's identity is made of, besides its config (small, JSON, sent to workers)."""

    old: dict[str, Any]  # model_identity of the old model
    new: dict[str, Any]
    training_set: str  # SampleSetInfo.fingerprint: sha256 of the stored rows in position order
    training_rows: int  # rows of the training set: with the worker count, whether a short last batch is dropped
    cached_old_table: str | None = None  # sha256 of the cached table's bytes (mask_source: cached)

    def to_json(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "training_set": self.training_set,
            "training_rows": self.training_rows,
            "cached_old_table": self.cached_old_table,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IdentityInputs:
        return cls(
            old=d["old"],
            new=d["new"],
            training_set=d["training_set"],
            training_rows=d["training_rows"],
            cached_old_table=d["cached_old_table"],
        )


@dataclass(frozen=True)
class FinetuneIdentity:
    """The identity of one fine-tune: ``digest`` (sha256 hex) of ``hashed``, which manifests record."""

    digest: str
    hashed: dict[str, Any]

    @property
    def short(self) -> str:
        return self.digest[:16]

    def run_name(self, cfg: FinetuneConfig) -> str:
        """The Ray Train run folder and the default output name: the method and the identity."""
        return f"finetune-{cfg.loss.kind}-{self.short}"


def training_settings(cfg: FinetuneConfig, training_rows: int) -> dict[str, Any]:
    """The config fields that set the weights, as JSON, with the two cases where the worker count does too."""
    settings = cfg.model_dump(mode="json", exclude=set(NOT_IN_IDENTITY))
    settings["mixed_precision"] = cfg.mixed_precision and cfg.compute.use_gpu  # autocast runs on CUDA only
    workers = max(1, cfg.compute.num_workers)
    # a last global batch with fewer rows than workers is dropped (a share is never empty): one step fewer
    if cfg.batchnorm == "per-worker" or 0 < training_rows % cfg.batch_size < workers:
        settings["num_workers"] = workers
    return settings


def finetune_identity(cfg: FinetuneConfig, inputs: IdentityInputs) -> FinetuneIdentity:
    """The identity of fine-tuning ``cfg`` from the parents and data that ``inputs`` fingerprint."""
    hashed = {"version": IDENTITY_VERSION, **inputs.to_json(), "training": training_settings(cfg, inputs.training_rows)}
    blob = json.dumps(hashed, sort_keys=True, separators=(",", ":"), default=str).encode()
    return FinetuneIdentity(hashlib.sha256(blob).hexdigest(), hashed)
