"""Evaluate each model once into a per-sample table, compare pairs, build the paper table."""

from rcat_ray.core.lazy_exports import lazy_exports

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "CompareConfig": "config",
    "EvaluateConfig": "config",
    "TableConfig": "config",
    "run_compare": "run",
    "run_evaluate": "run",
    "run_table": "run",
}
__all__ = ["CompareConfig", "EvaluateConfig", "TableConfig", "run_compare", "run_evaluate", "run_table"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
