"""Sweep the fine-tuning weights with Ray Tune, choose on validation, test the choice."""

from importlib import import_module

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "SweepConfig": "config",
    "run_sweep": "run",
}
__all__ = ["SweepConfig", "run_sweep"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
