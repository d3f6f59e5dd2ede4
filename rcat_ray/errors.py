"""How the CLI reports what stops a command: input that cannot run (exit status 2, one clear message, before Ray
starts or the store is touched), a run that failed after its inputs were accepted (exit status 4, one line with
the cause: a worker crashed, the store could not be written; what finished is kept), and bugs, which keep their
traceback."""

from __future__ import annotations

from rcat_ray.comparison import ComparisonError
from rcat_ray.config import ConfigError
from rcat_ray.core.data import DataError
from rcat_ray.core.finetune import FinetuneInputError
from rcat_ray.core.flips import FlipInputError
from rcat_ray.core.identity import RunIdentityError
from rcat_ray.core.losses import LossConfigError
from rcat_ray.core.models import ModelError
from rcat_ray.evaluation import EvaluationInputError, EvaluationRunError
from rcat_ray.failures import RayStartError, _from_ray, describe_failure
from rcat_ray.selection import SelectionError, SweepFailedError
from rcat_ray.store import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, ModelError, EvaluationInputError, StoreError, FlipInputError, ComparisonError,
    LossConfigError, SelectionError, FinetuneInputError, RunIdentityError,
)  # fmt: skip

#: Our own errors of a run that failed after its inputs were accepted; their message names the cause and says
#: what was kept (a chunk that failed on a worker, every trial of a sweep failed).
RUN_ERRORS: tuple[type[Exception], ...] = (EvaluationRunError, SweepFailedError, RayStartError)

__all__ = ["RUN_ERRORS", "USER_ERRORS", "describe_failure", "is_run_failure"]


def is_run_failure(err: BaseException) -> bool:
    """A failure of the run, not of its input and not a bug of ours: one of :data:`RUN_ERRORS`, an ``OSError``
    (a full disk, a store that went away; input files are checked before the run, and a closed pipe is
    handled on its own), or an error raised by Ray (a task or actor that failed or died, a failed Ray Train
    run). Input errors (:data:`USER_ERRORS`) are not, even where Ray carried one from a worker."""
    if isinstance(err, USER_ERRORS):
        return False
    return isinstance(err, (*RUN_ERRORS, OSError)) or _from_ray(err)
