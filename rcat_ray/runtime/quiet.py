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
* Lines Ray forwards from its workers (``log_to_driver``) that only concern Ray's own machinery: every line
  of Ray Train's controller (in quiet mode it logs only errors, and a failed run reaches the caller as an
  exception, which the CLI reports in one line) and of its placement-group cleaner, Python tracebacks
  printed by any worker (the failure they belong to is reported the same way), and Ray Train's per-report
  line. Ray prints forwarded lines itself (``ray._private.worker.print_worker_logs``, which has no public
  hook): :func:`before_ray_init` wraps it, so each batch of lines is split into what the terminal shows and
  what is held back, and everything, shown or held back, also goes to the ``--log-file``
  (:func:`add_log_handler`). Ray Data's log records that announce a failed execution (its exception then
  reaches the caller) are dropped from its console handler only.

Colour codes never reach a pipe or a file, in either mode. Ray wraps the prefix of each forwarded line
(``(RayTrainWorker pid=...)``) in ANSI colours whatever its output is; ``RAY_COLOR_PREFIX=0``, Ray's own
switch, turns that off and is set when stdout or stderr is not a terminal (a user's explicit choice stays).
What the switch does not reach (the ``[repeated 3x across cluster]`` note of Ray's log deduplication, the
coloured ``ray::Actor.method()`` header of a remote traceback, the dashboard URL) is stripped: from
forwarded lines by the wrapper above, from Ray's driver-side console handlers by a filter, from the
``--log-file`` by its formatter (:class:`PlainFormatter`) and, last, by the stderr filter process.

Library users who never call :func:`configure_quiet` keep every default of Ray and Python.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from typing import Any

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

#: Ray Data's log records that announce a failed execution; the exception itself reaches the caller (the CLI
#: says it in one line), so in quiet mode they are dropped from Ray Data's console handler (its file keeps them).
_RAY_DATA_FAILURE_NOTICES = _DropMessages(
    "An exception was raised from a task of operator", "Exception occurred in user code",
    "Exception occurred in Ray Data or Ray Core internal code", "Full stack trace",
)  # fmt: skip

_state: dict = {
    "verbose": None, "native_filter": None, "terminal": {}, "log_handlers": [], "worker_logs": None,
}  # fmt: skip

# -- colour codes --------------------------------------------------------------------------------------------
#: An ANSI escape sequence (CSI ... final byte, or a two-byte escape): what colours a line in a terminal.
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-_])")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colours, bold, resets)."""
    return ANSI_ESCAPE.sub("", text) if "\x1b" in text else text


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is shown in a terminal. For stdout and stderr the answer recorded by
    :func:`configure_quiet` counts: once the stderr filter runs, file descriptor 2 is a pipe even when the
    user looks at a terminal."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, a StringIO: not a terminal
        return False
    known = _state["terminal"].get(fd)
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


_STRIP_ANSI = _StripAnsi()


# -- the --log-file --------------------------------------------------------------------------------------------
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
_RAY_LOGGERS = ("ray", "ray.data")


class _RayWarningsOnly(logging.Filter):
    """A log-file handler filter: from Ray's own loggers only warnings and errors; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not (record.name == "ray" or record.name.startswith("ray."))


def add_log_handler(handler: logging.Handler) -> None:
    """Send what the terminal shows and what quiet mode holds back to ``handler`` as well (the CLI's
    ``--log-file``): forwarded worker lines, the traceback behind a one-line failure message, and Ray's own
    warnings and errors (attached to Ray's loggers once Ray has configured them, see :func:`after_ray_init`)."""
    handler.addFilter(_RayWarningsOnly())
    _state["log_handlers"].append(handler)
    for logger in (WORKER_LOG, LOG_FILE_ONLY):
        logger.addHandler(handler)
    if "ray" in sys.modules:
        _attach_log_handlers_to_ray()


def _attach_log_handlers_to_ray() -> None:
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in _state["log_handlers"]:
            if handler not in logger.handlers:
                logger.addHandler(handler)


def configure_quiet(verbose: bool) -> None:
    """Decide once, first thing in the CLI, whether third-party noise reaches the user (``verbose``) or not.

    What can be set before Ray starts is set here (a logger filter, warnings filters); what needs Ray is
    applied by :func:`rcat_ray.runtime.cluster.ensure_ray` through :func:`ray_init_options`,
    :func:`before_ray_init` and :func:`after_ray_init`. Meant to be called once per process: a later call
    with ``verbose=True`` lifts the logger filter, but warnings filters and a running stderr filter stay.
    """
    _state["verbose"] = bool(verbose)
    for fd in (1, 2):  # before the stderr filter makes fd 2 a pipe
        try:
            _state["terminal"][fd] = os.isatty(fd)
        except OSError:
            _state["terminal"][fd] = False
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


def train_run_options() -> dict:
    """Extra ``ray.train.RunConfig`` arguments: Ray Train's own console logs (worker-group set-up, every
    report and checkpoint, and the placement-group cleaner's notices that the state API is absent without the
    dashboard) at ERROR when quiet. Our progress lines come from the ``rcat_ray.core.progress`` logger and stay."""
    if not is_quiet():
        return {}
    from ray.train import LoggingConfig

    return {"logging_config": LoggingConfig(log_level="ERROR")}


def before_ray_init() -> None:
    """Start the stderr filter for the C++ lines the driver's core worker writes, when quiet, and route the
    lines Ray forwards from its workers (see :func:`route_worker_logs`), when configured.

    Started before ``ray.init`` so the core worker (created there) already writes into the filter, and Ray's
    log thread (started there) already prints through the router.
    """
    if is_quiet():
        _start_native_filter()
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
                if _RAY_DATA_FAILURE_NOTICES not in handler.filters:
                    handler.addFilter(_RAY_DATA_FAILURE_NOTICES)
    if not is_terminal(sys.stderr):  # Ray's console handlers write to stderr: no colour codes in a pipe or file
        for name in _RAY_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if handler.get_name() != "file" and _STRIP_ANSI not in handler.filters:
                    handler.addFilter(_STRIP_ANSI)
    _attach_log_handlers_to_ray()


# -- lines forwarded from Ray's workers ------------------------------------------------------------------------
#: Ray's own actors: what they print concerns Ray (held back when quiet, kept in the log file).
RAY_INTERNAL_ACTORS: tuple[str, ...] = ("TrainController", "PlacementGroupCleaner")
#: Single forwarded lines held back when quiet (regexes on the line without its prefix).
HELD_BACK_LINES: tuple[str, ...] = (r"Reporting training result \d+: TrainingReport",)
_HELD_BACK = re.compile("|".join(HELD_BACK_LINES))
#: How a Python traceback goes on after its first line: indented frames, the chaining notes, blank lines, the
#: exception line (``ValueError: ...``, ``ray.exceptions.GetTimeoutError: ...``).
_TRACEBACK_START = ("Traceback (most recent call last):", "The above exception was the direct cause",
                    "During handling of the above exception")  # fmt: skip
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Interrupted|Warning)\b")


class WorkerLineRouter:
    """Decides, line by line, which forwarded lines quiet mode holds back; keeps the state a traceback needs
    (its lines arrive one per line, possibly in several batches, per worker)."""

    def __init__(self):
        self._in_traceback: set[tuple[Any, Any]] = set()
        self._lock = threading.Lock()

    def held_back(self, data: dict, line: str) -> bool:
        source = data.get("pid")
        if source in ("autoscaler", "raylet"):  # the cluster's own notices: resources, node failures
            return False
        text = strip_ansi(line)
        key = (data.get("ip"), source)
        with self._lock:
            if text.startswith(_TRACEBACK_START):
                self._in_traceback.add(key)
                return True
            if key in self._in_traceback:
                if not text.strip() or text[:1].isspace() or _EXCEPTION_LINE.match(text):
                    return True
                self._in_traceback.discard(key)
        name = data.get("actor_name") or data.get("task_name") or ""
        return name.startswith(RAY_INTERNAL_ACTORS) or bool(_HELD_BACK.search(text))


class _ForwardedLines:
    """Where Ray's ``print_worker_logs`` writes one run of lines: the console stream (``None`` for lines held
    back), without colour codes unless that stream is a terminal, and the log file, always without them."""

    def __init__(self, stream: Any):
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        if self.stream is not None:
            self.stream.write(text if is_terminal(self.stream) else strip_ansi(text))
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            WORKER_LOG.info(strip_ansi(line))
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()


def route_worker_logs() -> bool:
    """Wrap Ray's printer of forwarded worker lines (once per process): held-back lines go to the log file
    only (to the terminal too with ``--verbose``), shown lines to both, colour codes only to a terminal.

    Ray 2.60 prints every batch of forwarded lines, and the last ones when it shuts down, through
    ``ray._private.worker.print_worker_logs(data, print_file, ignore_prefix)``; wrapping that one function
    keeps Ray's own formatting, deduplication and tqdm handling. Returns False (and leaves Ray as it is)
    where that function is missing: ``RAY_COLOR_PREFIX`` and the stderr filter still apply then.
    """
    if _state["worker_logs"] is not None:
        return True
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return False
    original = getattr(ray_worker, "print_worker_logs", None)
    if not callable(original):
        return False
    router = WorkerLineRouter()

    def print_worker_logs(data: dict, print_file: Any, ignore_prefix: bool = False) -> None:
        lines = list(data.get("lines") or ())
        runs: list[tuple[bool, list[str]]] = []  # consecutive lines with the same fate, in order
        for line in lines:
            held = is_quiet() and router.held_back(data, line)
            if runs and runs[-1][0] == held:
                runs[-1][1].append(line)
            else:
                runs.append((held, [line]))
        if not runs:  # nothing to print: Ray's own bookkeeping (its tqdm bars) all the same
            original(data, print_file, ignore_prefix)
        for held, group in runs:
            original(dict(data, lines=group), _ForwardedLines(None if held else print_file), ignore_prefix)

    print_worker_logs.__wrapped__ = original  # type: ignore[attr-defined]
    ray_worker.print_worker_logs = print_worker_logs
    _state["worker_logs"] = (ray_worker, original)
    return True


# -- the filter of file descriptor 2 ---------------------------------------------------------------------
# Runs as its own small process (not a thread), so that output written just before a crash or os._exit of
# the driver is still passed on: the filter reads until every writer has gone.
_FILTER_PROGRAM = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
pattern = re.compile("|".join(sys.argv[1:]).encode())
plain = not os.isatty(1)  # colour codes only into a terminal
ansi = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-_])")
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
        put(ansi.sub(b"", kept) if plain else kept)
if pending and not pattern.search(pending):
    put(ansi.sub(b"", pending) if plain else pending)
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
