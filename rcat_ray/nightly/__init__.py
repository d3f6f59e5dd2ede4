"""The nightly gate: production model against the newest candidate, history, notifiers, report."""

from rcat_ray.core.lazy_exports import lazy_exports

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "NightlyConfig": "config",
    "run_nightly": "run",
}
__all__ = ["NightlyConfig", "run_nightly"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
