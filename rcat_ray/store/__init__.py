"""The result store: content-addressed artifacts, atomic writes, checksummed manifests, quarantine."""

from rcat_ray.core.lazy_exports import lazy_exports

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "ResultStore": "result_store",
}
__all__ = ["ResultStore"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
