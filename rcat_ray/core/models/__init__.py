"""Models: built-in architectures (:mod:`.architectures`), loading from checkpoints and RobustBench with
weight fingerprints (:mod:`.loading`), references that workers load by themselves (:mod:`.refs`), and the
check that models fit the data (:mod:`.checks`)."""

from rcat_ray.core.models.architectures import architectures, build_architecture, register_architecture
from rcat_ray.core.models.checks import validate_pair_inputs
from rcat_ray.core.models.loading import (
    CHECKPOINT_FORMAT,
    LoadedModel,
    check_model_source,
    checkpoint_metadata,
    fingerprint_module,
    fingerprint_state_dict,
    from_module,
    import_robustbench,
    load_model,
    register_autoattack_alias,
    robustbench_checkpoint_path,
    save_checkpoint,
)
from rcat_ray.core.models.refs import ModelRef, load_reference, model_reference

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedModel",
    "ModelRef",
    "architectures",
    "build_architecture",
    "check_model_source",
    "checkpoint_metadata",
    "fingerprint_module",
    "fingerprint_state_dict",
    "from_module",
    "import_robustbench",
    "load_model",
    "load_reference",
    "model_reference",
    "register_architecture",
    "register_autoattack_alias",
    "robustbench_checkpoint_path",
    "save_checkpoint",
    "validate_pair_inputs",
]
