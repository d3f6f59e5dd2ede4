"""Quiet by default: what Ray and the model libraries print for their own developers stays out of the user's way.

Each kind of noise is silenced where it comes from, never by lowering what goes into Ray's log files, and
``--verbose`` shows all of it: the choice and the logger and warnings filters (:mod:`.mode`, with
``ray.init(logging_level=WARNING)``); what is set around ``ray.init`` (:mod:`.startup`); the lines Ray forwards
from its workers (:mod:`.worker_lines`); the C++ lines on the driver's stderr (:mod:`.stderr_filter`); colour
codes (never into a pipe or a file; ``RAY_COLOR_PREFIX=0`` is set when stdout or stderr is not a terminal) and
the ``--log-file`` (:mod:`.output`). Library users who never call :func:`configure_quiet` keep every default.
"""

from rcat_ray.runtime.quiet.mode import configure_quiet, is_configured, is_quiet, ray_init_options
from rcat_ray.runtime.quiet.output import (
    ANSI_ESCAPE,
    LOG_FILE_ONLY,
    WORKER_LOG,
    PlainFormatter,
    add_log_handler,
    is_terminal,
    strip_ansi,
)
from rcat_ray.runtime.quiet.startup import after_ray_init, before_ray_init
from rcat_ray.runtime.quiet.stderr_filter import HARMLESS_NATIVE_LINES
from rcat_ray.runtime.quiet.worker_lines import (
    HELD_BACK_LINES,
    RAY_INTERNAL_ACTORS,
    WorkerLineRouter,
    route_worker_logs,
)

__all__ = [
    "ANSI_ESCAPE",
    "HARMLESS_NATIVE_LINES",
    "HELD_BACK_LINES",
    "LOG_FILE_ONLY",
    "RAY_INTERNAL_ACTORS",
    "WORKER_LOG",
    "PlainFormatter",
    "WorkerLineRouter",
    "add_log_handler",
    "after_ray_init",
    "before_ray_init",
    "configure_quiet",
    "is_configured",
    "is_quiet",
    "is_terminal",
    "ray_init_options",
    "route_worker_logs",
    "strip_ansi",
]
