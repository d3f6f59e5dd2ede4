"""``rcat-ray finetune``: check the inputs in the driver, train on Ray Train, write the final checkpoint.

The entry point the CLI, the demo, the sweep, jobs and bench call. Importing it does not load Ray: the Ray
Train adapter (:mod:`rcat_ray.finetune.ray_train`) is imported only when a run trains.
"""

from __future__ import annotations

import os
from pathlib import Path

from rcat_ray.errors import ModelError
from rcat_ray.finetune.checkpoints import FinetuneOutcome, finished_finetune, read_state, write_final
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.inputs import Parents, cached_mask, identity_inputs
from rcat_ray.finetune.sets import SampleSets, load_parents, prepare_sample_sets, training_samples, validation_setup

__all__ = ["FinetuneOutcome", "Parents", "check_finetune_inputs", "run_finetune"]


def check_finetune_inputs(cfg: FinetuneConfig) -> Parents:
    """Everything that can be wrong, checked in the driver before any worker starts; returns the parents
    so the driver does not load them again after training.

    Prepares the training and validation sets in the store on first use (later runs reuse them) and checks
    the models on two training rows: the training split itself is never loaded here. The output path must be
    free or hold this very fine-tune (same identity).
    """
    from rcat_ray.core.models import validate_pair_inputs

    train_set = training_samples(cfg)
    old, new = load_parents(cfg, train_set)
    validate_pair_inputs([old, new], train_set.to_split(0, min(2, len(train_set))))
    if "arch" not in new.source:
        raise ModelError(
            "the new model's architecture is unknown, so the fine-tuned model could not be saved: give the new "
            "model's `arch` (a checkpoint written by rcat_ray names it)"
        )
    # FinetuneInputError for flags that are not the old model's on this selection, or do not cover it
    cached = cached_mask(cfg, train_set, old.fingerprint)
    val_set, _ = validation_setup(cfg)
    Path(cfg.out).expanduser().mkdir(parents=True, exist_ok=True)
    inputs = identity_inputs(old, new, train_set, cached)
    parents = Parents(old, new, train_set.info.shape, SampleSets(train_set.uri, val_set.uri), inputs)
    parents.finished = finished_finetune(cfg, parents.identity(cfg))  # RunIdentityError: another fine-tune there
    return parents


def run_finetune(cfg: FinetuneConfig, parents: Parents | None = None) -> FinetuneOutcome:
    """Fine-tune on Ray Train and write the final checkpoint and manifest into ``cfg.out``.

    ``parents``: what :func:`check_finetune_inputs` returned, for a caller that checked the inputs
    before starting Ray (so that a bad input fails fast and the parents are not loaded twice). A fine-tune
    with the same identity already at the output path is returned as it is (``reused``); the Ray Train run
    folder is named by the identity, so only a snapshot of this very fine-tune is ever resumed.
    """
    if parents is None:
        parents = check_finetune_inputs(cfg)
    identity = parents.identity(cfg)
    done = finished_finetune(cfg, identity)
    if done is not None:
        return done
    from rcat_ray.finetune.ray_train import train_run

    sets = parents.samples or prepare_sample_sets(cfg)
    # small by design: the config, two set locations and the fingerprints; workers read rows and load models
    loop_config = {
        "finetune": cfg.model_dump(mode="json"),
        "driver_pid": os.getpid(),
        "samples": sets.to_json(),
        "inputs": parents.inputs.to_json() if parents.inputs else None,
    }
    result = train_run(cfg, identity, loop_config).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning {identity.run_name(cfg)} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = read_state(d)
    # the history travels in the checkpoint, so it spans worker-group restarts
    return write_final(cfg, state, list(state.get("history", [])), parents)
