"""The paper's experiment as one job: pairs x methods x seeds, chosen on validation, tested, one table."""

from rcat_ray.core.lazy_exports import lazy_exports

#: Public name -> the module of this folder that defines it; imported on first use, so importing the folder
#: loads nothing (and never Ray).
_WHERE = {
    "StudyConfig": "config",
    "run_study": "run",
}
__all__ = ["StudyConfig", "run_study"]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
