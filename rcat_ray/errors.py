"""The errors that mean "your input is wrong" (exit status 2), as opposed to bugs or crashes."""

from __future__ import annotations

from rcat_ray.comparison import ComparisonError
from rcat_ray.config import ConfigError
from rcat_ray.core.data import DataError
from rcat_ray.core.flips import FlipInputError
from rcat_ray.core.losses import LossConfigError
from rcat_ray.core.models import ModelError
from rcat_ray.evaluation import EvaluationInputError
from rcat_ray.selection import SelectionError
from rcat_ray.store import StoreError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, ModelError, EvaluationInputError, StoreError, FlipInputError, ComparisonError,
    LossConfigError, SelectionError,
)  # fmt: skip
