"""A fine-tune's files: the training state each epoch's snapshot holds, and the final self-describing checkpoint
with its manifest (naming both parents' fingerprints and the run's identity), which the flip engine loads like
any other model. A path holding another fine-tune is never overwritten.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.core.batchnorm import has_batchnorm
from rcat_ray.core.models import checkpoint_metadata, save_checkpoint
from rcat_ray.errors import ModelError, RunIdentityError
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.identity import FinetuneIdentity
from rcat_ray.store.result_store import now_iso, package_versions

if TYPE_CHECKING:
    from rcat_ray.finetune.inputs import Parents

#: The training state in every epoch's snapshot (model, optimizer, scheduler, scaler, epoch, RNG, history).
STATE_FILE = "state.pt"


@dataclass
class FinetuneOutcome:
    """Where the fine-tuned model is and what the run reported."""

    checkpoint: Path
    manifest: Path
    fingerprint: str
    history: list[dict[str, Any]]
    reused: bool = False  # found at the output path with the same identity: nothing was trained


def read_state(folder: str | Path) -> dict[str, Any]:
    """The training state of a snapshot folder (CPU tensors)."""
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def check_state_identity(state: dict[str, Any], identity: FinetuneIdentity, what: str) -> None:
    """Refuse a training state recorded under another identity (or none): loading it would continue, or write
    out, a model trained from other parents, data or settings than this run names."""
    found = state.get("identity")
    if found != identity.digest:
        raise RunIdentityError(
            f"{what} belongs to fine-tune {found or '(no identity recorded)'}, not to this run ({identity.digest}); "
            "it is not loaded"
        )


def output_paths(cfg: FinetuneConfig, identity: FinetuneIdentity) -> tuple[Path, Path]:
    """(checkpoint, manifest) of a fine-tune: ``output`` and its ``.json`` when the config names an exact path,
    else ``<out>/<name>-<identity>.pt`` (``finetune-<loss>-<identity>.pt`` without a name), so that a run with
    other parents, data or settings under the same name gets files of its own."""
    if cfg.output:
        path = Path(cfg.output)
        return path, path.with_suffix(".json")
    label = f"{cfg.name}-{identity.short}" if cfg.name else identity.run_name(cfg)
    out = Path(cfg.out).expanduser()
    return out / f"{label}.pt", out / f"{label}.json"


def finished_finetune(cfg: FinetuneConfig, identity: FinetuneIdentity) -> FinetuneOutcome | None:
    """The fine-tune already at the output path when it has this identity; None when there is none.

    RunIdentityError (exit 2, nothing trained, nothing overwritten) when the path holds another fine-tune, or a
    checkpoint whose weights are not the ones its manifest records.
    """
    path, manifest_path = output_paths(cfg, identity)
    if not path.exists():
        return None
    try:
        meta = checkpoint_metadata(path)
    except ModelError as err:
        raise RunIdentityError(f"{err}; it is not overwritten: choose another --output") from None
    recorded = meta.get("identity")
    if recorded != identity.digest:
        raise RunIdentityError(
            f"{path} holds fine-tune {recorded or '(no identity recorded)'}, but this command asks for "
            f"{identity.digest} (other parents, data or settings); it is not overwritten: choose another --output, "
            "or leave --output out to name the file by the run's identity"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        fingerprint = manifest["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # this fine-tune's checkpoint without its manifest (written last): written again
    if meta.get("fingerprint") != fingerprint or manifest.get("identity") != identity.digest:
        raise RunIdentityError(f"{path}: its weights are not the ones {manifest_path} records (damaged); move it away")
    return FinetuneOutcome(path, manifest_path, fingerprint, list(manifest.get("history", [])), reused=True)


def write_final(
    cfg: FinetuneConfig, state: dict[str, Any], history: list[dict[str, Any]], parents: Parents
) -> FinetuneOutcome:
    """Write the trained state as a self-describing checkpoint with its manifest, after checking that the state
    is this fine-tune's (its identity)."""
    old, new = parents.old, parents.new
    identity = parents.identity(cfg)
    check_state_identity(state, identity, "the trained state")
    finished_finetune(cfg, identity)  # again: another run may have written another fine-tune there meanwhile
    module = copy.deepcopy(new.module)  # the parent stays as it was loaded
    module.load_state_dict(state["model"])
    path, manifest_path = output_paths(cfg, identity)
    manifest = {
        "kind": "finetuned-model",
        "run_name": identity.run_name(cfg),
        "label": path.stem,
        "identity": identity.digest,
        "identity_inputs": identity.hashed,
        "method": cfg.loss.tag,
        "config": cfg.model_dump(mode="json"),
        "parents": {"old": old.describe(), "new": new.describe()},
        "batchnorm": {
            "model_has_batchnorm": has_batchnorm(module),
            "statistics": cfg.batchnorm,
            "workers": max(1, cfg.compute.num_workers),
        },
        "epochs_completed": int(state["epoch"]) + 1,
        "history": history,
        "versions": package_versions(),
        "created_at": now_iso(),
    }
    arch_kwargs = new.source.get("arch_kwargs", {})
    fingerprint = save_checkpoint(
        path,
        module,
        arch=new.source["arch"],
        num_classes=new.num_classes,
        input_shape=parents.input_shape,
        arch_kwargs=arch_kwargs,
        metadata={
            "method": cfg.loss.tag,
            "old_fingerprint": old.fingerprint,
            "new_fingerprint": new.fingerprint,
            "run_name": identity.run_name(cfg),
            "identity": identity.digest,
        },
    )
    manifest["fingerprint"] = fingerprint
    # the manifest is written last: a checkpoint without one is not a finished fine-tune
    write_file_atomic(manifest_path, json.dumps(manifest, indent=2, default=str))
    return FinetuneOutcome(path, manifest_path, fingerprint, history)
