"""The result store: content-addressed artifacts, atomic writes, checksummed manifests, quarantine."""

from importlib import import_module

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "ResultStore": "result_store",
}
__all__ = ["ResultStore"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
