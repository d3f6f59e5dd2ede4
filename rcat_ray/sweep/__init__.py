"""Sweep the fine-tuning weights with Ray Tune, choose on validation, test the choice."""

from rcat_ray.core.lazy_exports import lazy_exports

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "SweepConfig": "config",
    "run_sweep": "run",
}
__all__ = ["SweepConfig", "run_sweep"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
