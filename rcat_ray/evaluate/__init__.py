"""Evaluate each model once into a per-sample table, compare pairs, build the paper table."""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
