"""The one choice, made first thing in the CLI: does third-party noise reach the user (``--verbose``) or not.

What can be set before Ray starts is set by :func:`configure_quiet`: filters on the few Ray loggers whose
notices mean nothing to a user (the token-auth notice, logged inside ``ray.init`` although auth is the safe
default; Ray Data's note that its bars are off, our choice), and ``warnings`` filters for the deprecations of
torch, timm, robustbench and Ray (unless the user chose with ``-W`` or ``PYTHONWARNINGS``). Nothing lowers
what goes into Ray's log files. Library users who never call it keep every default of Ray and Python.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rcat_ray.runtime.quiet.output import record_terminals

_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of the prefixes (a logger filter: it sees only the
    records of its own logger, so nothing else Ray logs is affected)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_AUTH_NOTICES = _DropMessages(
    "Token authentication is enabled for this Ray cluster", "Generated new authentication token"
)
#: Ray Data warns once that its bars are off: here that is our choice, not something to fix.
_RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
_BARS_OFF_NOTICE = _DropMessages("Progress bars disabled")

#: Ray Data's log records that announce a failed execution; the exception itself reaches the caller (the CLI
#: says it in one line), so in quiet mode they are dropped from Ray Data's console handler (its file keeps them).
RAY_DATA_FAILURE_NOTICES = _DropMessages(
    "An exception was raised from a task of operator",
    "Exception occurred in user code",
    "Exception occurred in Ray Data or Ray Core internal code",
    "Full stack trace",
)

_state: dict = {"verbose": None}


def configure_quiet(verbose: bool) -> None:
    """Decide once, first thing in the CLI, whether third-party noise reaches the user (``verbose``) or not.

    What can be set before Ray starts is set here (a logger filter, warnings filters); what needs Ray is
    applied by :func:`rcat_ray.runtime.cluster.ensure_ray` through :func:`ray_init_options`,
    :func:`before_ray_init` and :func:`after_ray_init`. Meant to be called once per process: a later call
    with ``verbose=True`` lifts the logger filter, but warnings filters and a running stderr filter stay.
    """
    _state["verbose"] = bool(verbose)
    record_terminals()  # before the stderr filter makes fd 2 a pipe
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        # Ray's own switch for the colour of forwarded lines' prefixes (read when it prints; a user's choice stays)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name, notice in ((_AUTH_LOGGER, _AUTH_NOTICES), (_RAY_DATA_PROGRESS_LOGGER, _BARS_OFF_NOTICE)):
        logger = logging.getLogger(name)  # filters set before Ray imports the module that logs: nothing missed
        logger.removeFilter(notice)
        if not verbose:
            logger.addFilter(notice)
    if verbose:
        return
    if not sys.warnoptions:  # -W or PYTHONWARNINGS given: the user chose, keep their choice
        not_ours = r"(?!rcat_ray(\.|$))"  # our own deprecations, if any, are for our users
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=not_ours)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)


def is_quiet() -> bool:
    """True only after ``configure_quiet(verbose=False)``: library callers get Ray's defaults."""
    return _state["verbose"] is False


def is_configured() -> bool:
    """Whether :func:`configure_quiet` was called at all (the CLI); if not, Ray Data's settings are left alone."""
    return _state["verbose"] is not None


def ray_init_options() -> dict:
    """Extra ``ray.init`` arguments: the ``ray`` logger at WARNING when quiet (Ray's default INFO otherwise)."""
    return {"logging_level": logging.WARNING} if is_quiet() else {}
