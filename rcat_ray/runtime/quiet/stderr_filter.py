"""A filter on the driver's file descriptor 2 for the C++ lines no Python logger reaches.

The driver's core worker writes an ERROR (``core_worker.cc: Actor with class name ... has constructor arguments
in the object store and max_restarts > 0``) straight to fd 2 whenever Ray Data starts an actor pool; it is
harmless, and the only knob (``RAY_BACKEND_LOG_LEVEL``) would drop every error from every log file of a local
cluster. So in quiet mode fd 2 goes through a small process that drops exactly the known harmless lines
(:data:`HARMLESS_NATIVE_LINES`), passes everything else on in order, and strips colour codes from a pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys

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

_state: dict = {"native_filter": None}

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


def start_native_filter() -> None:
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
            stdin=subprocess.PIPE,
            stdout=real,
            stderr=real,
            start_new_session=True,
        )
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
