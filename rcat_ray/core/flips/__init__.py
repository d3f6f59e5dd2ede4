"""Per-sample flip statistics between an old and a new model: the comparison behind every report.

Attacking a model yields one per-model table; comparing two models is a join of two such tables on
``sample_id`` (:func:`flip_table`, :mod:`.table`) reduced to rates (:mod:`.metrics`) with paired bootstrap
confidence intervals (:func:`summarize`, :func:`paired_difference`, :mod:`.bootstrap`), printed by
:func:`format_summary` (:mod:`.text`). Pure numpy/pyarrow: instant and testable without Ray or torch.
Table schemas and metric definitions: docs/contracts.md.
"""

from rcat_ray.core.flips.bootstrap import paired_difference, summarize
from rcat_ray.core.flips.metrics import METRIC_LABELS, METRICS, NEAR_MARGIN, ROBUST_METRICS
from rcat_ray.core.flips.table import FLIP_SCHEMA, flip_table
from rcat_ray.core.flips.text import format_summary
from rcat_ray.errors import FlipInputError

__all__ = [
    "FLIP_SCHEMA",
    "METRICS",
    "METRIC_LABELS",
    "NEAR_MARGIN",
    "ROBUST_METRICS",
    "FlipInputError",
    "flip_table",
    "format_summary",
    "paired_difference",
    "summarize",
]
