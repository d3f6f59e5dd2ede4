"""Fine-tune the new model (RCAT, PCT, PCAT, AT) on Ray Train, and train models from scratch."""

from rcat_ray.core.lazy_exports import lazy_exports

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "FinetuneConfig": "config",
    "TrainRecipe": "pretrain",
    "check_finetune_inputs": "run",
    "run_finetune": "run",
    "train_checkpoint": "pretrain",
}
__all__ = ["FinetuneConfig", "TrainRecipe", "check_finetune_inputs", "run_finetune", "train_checkpoint"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
