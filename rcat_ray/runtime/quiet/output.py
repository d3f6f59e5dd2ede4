"""Where shown and held-back lines go: colour codes only into a terminal, and the ``--log-file``.

Ray colours what it prints whatever its output is; what ``RAY_COLOR_PREFIX=0`` does not reach is stripped here
(:func:`strip_ansi`, :class:`PlainFormatter`, a filter on Ray's console handlers). The log file gets what the
terminal shows and what quiet mode holds back: forwarded worker lines (:data:`WORKER_LOG`), the traceback behind
a one-line failure (:data:`LOG_FILE_ONLY`) and Ray's own warnings and errors.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

#: Whether file descriptors 1 and 2 were terminals when quiet mode was configured (see :func:`is_terminal`).
_TERMINAL: dict[int, bool] = {}
#: The ``--log-file`` handlers (attached to Ray's loggers once Ray has configured them).
_LOG_HANDLERS: list[logging.Handler] = []

#: An ANSI escape sequence (CSI ... final byte, or a two-byte escape): what colours a line in a terminal.
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-_])")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colours, bold, resets)."""
    return ANSI_ESCAPE.sub("", text) if "\x1b" in text else text


def record_terminals() -> None:
    """Remember whether stdout and stderr are terminals, before the stderr filter makes fd 2 a pipe."""
    for fd in (1, 2):
        try:
            _TERMINAL[fd] = os.isatty(fd)
        except OSError:
            _TERMINAL[fd] = False


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is shown in a terminal. For stdout and stderr the answer recorded by
    :func:`configure_quiet` counts: once the stderr filter runs, file descriptor 2 is a pipe even when the
    user looks at a terminal."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, a StringIO: not a terminal
        return False
    known = _TERMINAL.get(fd)
    if known is not None:
        return known
    try:
        return os.isatty(fd)
    except OSError:
        return False


class PlainFormatter(logging.Formatter):
    """A formatter whose output never holds colour codes (for log files: lines from Ray may carry them)."""

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


class _StripAnsi(logging.Filter):
    """A handler filter that removes colour codes from a record's message (Ray's console handlers when stderr
    is not a terminal). The record is changed in place, so later handlers see the plain text too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = strip_ansi(message), None
        return True


#: The filter :func:`rcat_ray.runtime.quiet.startup.after_ray_init` puts on Ray's console handlers.
STRIP_ANSI = _StripAnsi()


#: Lines Ray forwards from its workers, shown or held back: they reach the log file through this logger (the
#: terminal gets the shown ones from Ray's own printing). It never propagates: the console has them already.
WORKER_LOG = logging.getLogger("rcat_ray.workers")
WORKER_LOG.propagate = False
WORKER_LOG.setLevel(logging.INFO)
#: Records for the log file only (the traceback of a failed run whose one-line message the user already got).
LOG_FILE_ONLY = logging.getLogger("rcat_ray.log_file")
LOG_FILE_ONLY.propagate = False
LOG_FILE_ONLY.setLevel(logging.DEBUG)
for _logger in (WORKER_LOG, LOG_FILE_ONLY):  # without a log file their records go nowhere, never to stderr
    _logger.addHandler(logging.NullHandler())  # (a logger without any handler falls back to logging.lastResort)
#: Ray's driver-side loggers do not propagate to the root logger; warnings and errors they log reach the log
#: file through a handler attached to them once Ray has configured them (their INFO chatter stays out).
RAY_LOGGERS = ("ray", "ray.data")


class _RayWarningsOnly(logging.Filter):
    """A log-file handler filter: from Ray's own loggers only warnings and errors; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not (record.name == "ray" or record.name.startswith("ray."))


def add_log_handler(handler: logging.Handler) -> None:
    """Send what the terminal shows and what quiet mode holds back to ``handler`` as well (the CLI's
    ``--log-file``): forwarded worker lines, the traceback behind a one-line failure message, and Ray's own
    warnings and errors (attached to Ray's loggers once Ray has configured them, see :func:`after_ray_init`)."""
    handler.addFilter(_RayWarningsOnly())
    _LOG_HANDLERS.append(handler)
    for logger in (WORKER_LOG, LOG_FILE_ONLY):
        logger.addHandler(handler)
    if "ray" in sys.modules:
        attach_log_handlers_to_ray()


def attach_log_handlers_to_ray() -> None:
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in _LOG_HANDLERS:
            if handler not in logger.handlers:
                logger.addHandler(handler)
