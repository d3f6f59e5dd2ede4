"""The errors the CLI reports as one clear message with exit status 2 (input that cannot run, or a run that
stopped and can be resumed), as opposed to bugs, which keep their traceback."""

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
from rcat_ray.selection import SelectionError, SweepFailedError
from rcat_ray.store import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, ModelError, EvaluationInputError, StoreError, FlipInputError, ComparisonError,
    LossConfigError, SelectionError, EvaluationRunError, SweepFailedError, FinetuneInputError,
    RunIdentityError,
)  # fmt: skip
