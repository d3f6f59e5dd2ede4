"""Lines Ray forwards from its workers (``log_to_driver``): which the terminal shows, which quiet mode holds back.

Held back: every line of Ray's own actors (Ray Train's controller, the placement-group cleaner), Python
tracebacks printed by any worker (the failure reaches the caller as an exception, reported in one line) and
Ray Train's per-report line. Ray prints forwarded lines itself (``ray._private.worker.print_worker_logs``, no
public hook): :func:`route_worker_logs` wraps it, and everything, shown or held back, also goes to the
``--log-file``.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from rcat_ray.runtime.quiet.mode import is_quiet
from rcat_ray.runtime.quiet.output import WORKER_LOG, is_terminal, strip_ansi

_state: dict = {"worker_logs": None}

#: Ray's own actors: what they print concerns Ray (held back when quiet, kept in the log file).
RAY_INTERNAL_ACTORS: tuple[str, ...] = ("TrainController", "PlacementGroupCleaner")
#: Single forwarded lines held back when quiet (regexes on the line without its prefix).
HELD_BACK_LINES: tuple[str, ...] = (
    r"Reporting training result \d+: TrainingReport",
    r"Checkpoint successfully created at: Checkpoint\(",  # a Tune trial's per-report line
)
_HELD_BACK = re.compile("|".join(HELD_BACK_LINES))
#: How a Python traceback goes on after its first line: indented frames, the chaining notes, blank lines, the
#: exception line (``ValueError: ...``, ``ray.exceptions.GetTimeoutError: ...``).
_TRACEBACK_START = (
    "Traceback (most recent call last):",
    "The above exception was the direct cause",
    "During handling of the above exception",
)
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
