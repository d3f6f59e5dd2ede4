"""Pages over stored results: the comparison report and the store inventory."""

from rcat_ray.core.lazy_exports import lazy_exports

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "write_report": "flip_report",
}
__all__ = ["write_report"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
