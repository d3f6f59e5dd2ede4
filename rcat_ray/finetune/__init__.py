"""Fine-tune the new model (RCAT, PCT, PCAT, AT) on Ray Train, and train models from scratch."""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
