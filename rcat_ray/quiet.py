"""Quiet by default: what Ray and the model libraries print for their own developers stays out of the user's way.

A user of ``rcat-ray`` reads its own progress lines and results; Ray's start-up chatter, Ray Data's
execution logs and progress bars, a harmless C++ error line, and the deprecation warnings of torch, timm
and robustbench tell them nothing they can act on, and bury the lines that do. ``--verbose`` shows all of it.

Each kind of noise is silenced where it comes from, never by lowering what goes into Ray's log files:

* Ray's token-auth notice ("Token authentication is enabled for this Ray cluster...") is a WARNING of one
  logger, logged inside ``ray.init`` even though enabling auth is the safe default: a filter on that logger
  drops exactly that notice (and the INFO that a token was generated). The auth mode itself is untouched,
  and the opposite warning (auth *disabled*) still shows.
* "Started a local Ray instance" and other INFO lines of the ``ray`` logger: ``ray.init(logging_level=WARNING)``
  (see :func:`ray_init_options`).
* Ray Data's "Starting execution of Dataset..." / "Execution plan..." / "execution finished" lines and its
  progress bars (logged line by line when stdout is not a terminal): the ``DataContext`` switches that
  produce them are turned off, and the ``console`` handler of the ``ray.data`` logger shows WARNING and
  above; its ``ray-data.log`` file keeps everything. Its one-time warning that the bars are off (our choice
  here) is dropped by a filter on the logger that says it.
* ``core_worker.cc: Actor with class name: 'MapWorker(...)' ... has constructor arguments in the object
  store and max_restarts > 0``: an ERROR that the driver's C++ core worker writes straight to file
  descriptor 2 whenever Ray Data starts an actor pool (Ray Data always passes the actors' arguments by
  reference and restarts actors by default; the only way around it, ``max_restarts=0``, is a deprecated
  argument and would give up actor fault tolerance). C++ logs know no Python logger, and the only knob,
  ``RAY_BACKEND_LOG_LEVEL``, announces itself with a line of its own and would drop every error from every
  log file of a local cluster, so the driver's fd 2 goes through a small filter process that drops exactly
  the known harmless lines (:data:`HARMLESS_NATIVE_LINES`) and passes everything else on, in order.
* Deprecation and future warnings that third-party code raises (torch's ``torch.jit.interface``, timm's
  old module paths, robustbench's ``pkg_resources``, Ray's own): ``warnings`` filters, unless the user
  chose filters with ``-W`` or ``PYTHONWARNINGS``.

Library users who never call :func:`configure_quiet` keep every default of Ray and Python.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
import warnings

#: Lines that C++ code writes to the driver's stderr and that never need the user's attention (regexes).
HARMLESS_NATIVE_LINES: tuple[str, ...] = (
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
    r"and max_restarts > 0",
    # Lines Ray forwards from Ray Train's actors (log_to_driver) that Train's LoggingConfig does not reach: the
    # per-report INFO line of every worker, and the placement-group cleaner's monitor, which without the
    # dashboard's state API can only warn (or, with a second Ray instance on the machine, die in its thread);
    # it guards against leaks that only a Tune scheduler stopping a Train run can cause (sweeps start the
    # dashboard for that case).
    r"\(RayTrainWorker pid=\d+\).*Reporting training result \d+: TrainingReport",
    r"\(PlacementGroupCleaner pid=\d+\)",
)

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

_state: dict = {"verbose": None, "native_filter": None}


def configure_quiet(verbose: bool) -> None:
    """Decide once, first thing in the CLI, whether third-party noise reaches the user (``verbose``) or not.

    What can be set before Ray starts is set here (a logger filter, warnings filters); what needs Ray is
    applied by :func:`rcat_ray.distributed.cluster.ensure_ray` through :func:`ray_init_options`,
    :func:`before_ray_init` and :func:`after_ray_init`. Meant to be called once per process: a later call
    with ``verbose=True`` lifts the logger filter, but warnings filters and a running stderr filter stay.
    """
    _state["verbose"] = bool(verbose)
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


def train_run_options() -> dict:
    """Extra ``ray.train.RunConfig`` arguments: Ray Train's own console logs (worker-group set-up, every
    report and checkpoint, and the placement-group cleaner's notices that the state API is absent without the
    dashboard) at ERROR when quiet. Our progress lines come from the ``rcat_ray.progress`` logger and stay."""
    if not is_quiet():
        return {}
    from ray.train import LoggingConfig

    return {"logging_config": LoggingConfig(log_level="ERROR")}


def before_ray_init() -> None:
    """Start the stderr filter for the C++ lines the driver's core worker writes, when quiet.

    Started before ``ray.init`` so the core worker (created there) already writes into it.
    """
    if is_quiet():
        _start_native_filter()


def after_ray_init() -> None:
    """Ray Data's progress bars and execution logs: off when quiet, and never drawn into a pipe or a file.

    Ray Data draws bars in a terminal and, when stdout is not one, logs their state every few seconds; our
    own progress lines (``rcat_ray.progress``) say the same in one line per chunk. With ``--verbose`` in a
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


# -- the filter of file descriptor 2 ---------------------------------------------------------------------
# Runs as its own small process (not a thread), so that output written just before a crash or os._exit of
# the driver is still passed on: the filter reads until every writer has gone.
_FILTER_PROGRAM = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
pattern = re.compile("|".join(sys.argv[1:]).encode())
writable = True
def put(data):
    global writable
    while data and writable:
        try:
            data = data[os.write(1, data):]
        except OSError:
            writable = False  # the reader is gone: keep draining so the driver never blocks on a full pipe
pending = b""
while True:
    data = os.read(0, 65536)
    if not data:
        break
    *lines, pending = (pending + data).split(b"\n")
    kept = b"".join(line + b"\n" for line in lines if not pattern.search(line))
    if kept:
        put(kept)
if pending and not pattern.search(pending):
    put(pending)
"""


def _start_native_filter() -> None:
    """Route this process's fd 2 through the filter program; the real stderr gets everything else, in order.

    Python's own ``sys.stderr`` writes to fd 2 as well, so our progress lines, tracebacks and the final
    message keep their order with the C++ lines. Not on Windows, and not when something else already
    replaced ``sys.stderr`` (pytest's capture, a notebook): file descriptors are theirs to manage then.
    """
    if _state["native_filter"] is not None or os.name != "posix" or sys.stderr is not sys.__stderr__:
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER_PROGRAM, *HARMLESS_NATIVE_LINES],
            stdin=subprocess.PIPE, stdout=real, stderr=real, start_new_session=True,
        )  # fmt: skip
    except OSError:  # no filter is better than no run
        return
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()
    _state["native_filter"] = (proc, real)
    atexit.register(_stop_native_filter)


def _stop_native_filter() -> None:
    """At exit, give fd 2 back and let the filter pass on what is still in the pipe before the process ends,
    so a shell prompt never appears above the last lines (registered before ``ray.init``, so it runs after
    Ray's own shutdown, whose lines still go through the filter)."""
    running = _state["native_filter"]
    if running is None:
        return
    proc, real = running
    _state["native_filter"] = None
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os.dup2(real, 2)  # the pipe's last writer in this process is gone: the filter reads to its end
    os.close(real)
    # a child process that still holds the pipe keeps the filter alive; it drains when that one exits
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
