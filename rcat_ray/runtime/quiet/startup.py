"""What quiet mode sets around ``ray.init`` (called by :func:`rcat_ray.runtime.cluster.ensure_ray`): the stderr
filter and the worker-line router before, Ray Data's progress bars, execution logs and console handlers after."""

from __future__ import annotations

import logging
import sys

from rcat_ray.runtime.quiet.mode import RAY_DATA_FAILURE_NOTICES, is_configured, is_quiet
from rcat_ray.runtime.quiet.output import RAY_LOGGERS, STRIP_ANSI, attach_log_handlers_to_ray, is_terminal
from rcat_ray.runtime.quiet.stderr_filter import start_native_filter
from rcat_ray.runtime.quiet.worker_lines import route_worker_logs


def before_ray_init() -> None:
    """Start the stderr filter for the C++ lines the driver's core worker writes, when quiet, and route the
    lines Ray forwards from its workers (see :func:`route_worker_logs`), when configured.

    Started before ``ray.init`` so the core worker (created there) already writes into the filter, and Ray's
    log thread (started there) already prints through the router.
    """
    if is_quiet():
        start_native_filter()
    if is_configured():
        route_worker_logs()


def after_ray_init() -> None:
    """Ray Data's progress bars and execution logs: off when quiet, and never drawn into a pipe or a file.

    Ray Data draws bars in a terminal and, when stdout is not one, logs their state every few seconds; our
    own progress lines (``rcat_ray.core.progress``) say the same in one line per chunk. With ``--verbose`` in a
    terminal its bars are shown. Does nothing unless :func:`configure_quiet` was called.
    """
    if not is_configured():
        return
    import ray.data  # imported here: it configures the "ray.data" logger that is adjusted below

    ctx = ray.data.DataContext.get_current()
    # Ray Data draws bars when stdout is a terminal (they go to stderr), else logs them line by line
    ctx.enable_progress_bars = not is_quiet() and sys.stdout.isatty() and sys.stderr.isatty()
    if is_quiet():
        ctx.print_on_execution_start = False
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":  # its "file" handler (ray-data.log) keeps every level
                handler.setLevel(logging.WARNING)
                if RAY_DATA_FAILURE_NOTICES not in handler.filters:
                    handler.addFilter(RAY_DATA_FAILURE_NOTICES)
    if not is_terminal(sys.stderr):  # Ray's console handlers write to stderr: no colour codes in a pipe or file
        for name in RAY_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if handler.get_name() != "file" and STRIP_ANSI not in handler.filters:
                    handler.addFilter(STRIP_ANSI)
    attach_log_handlers_to_ray()
