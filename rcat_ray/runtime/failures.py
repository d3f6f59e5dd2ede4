"""A failure in one line: the exception at the bottom of a chain, not the Ray machinery wrapped around it.

A chunk that cannot be written on a worker reaches the driver as Ray's ``RayTaskError(UserCodeException)``,
whose text is the worker's whole traceback (with colour codes) and whose original exception (the
``OSError``) was lost on the way: Ray Data raises ``UserCodeException(...) from err`` in the worker, and
an exception's ``__cause__`` does not survive pickling. What survives is the traceback text, in which every
exception of the chain has its ``Type: message`` line at the start of a line. :func:`describe_failure` takes
the first exception of the chain that is not Ray's own, as an object where Ray kept one (``RayTaskError.cause``,
Ray Train's ``worker_failures``, ``__cause__``) and from that text where it did not. Only the standard
library is used here: workers and the driver both import it.
"""

from __future__ import annotations

import re

from rcat_ray.errors import InputError, RunError
from rcat_ray.runtime.quiet import strip_ansi

#: The longest description returned (a Ray error's text can hold a whole actor state dump).
MAX_CHARS = 600

#: ``Type: message`` at the start of a line of a traceback text; the type is a (dotted) name ending like an
#: exception's (``OSError``, ``rcat_ray.evaluate.plan.EvaluationRunError``, ``KeyboardInterrupt``).
_EXCEPTION_LINE = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Interrupted|Failure|Fault))(?:: (?P<message>.*))?$"
)


def _from_ray(err: BaseException | type) -> bool:
    """Whether an exception (or its class) is Ray's: ``ray.exceptions.RayTaskError``, Ray Data's
    ``UserCodeException``, Ray Train's ``TrainingFailedError``, Tune's ``TuneError``..."""
    cls = err if isinstance(err, type) else type(err)
    return any(c.__module__ == "ray" or c.__module__.startswith("ray.") for c in cls.__mro__)


def _next_in_chain(err: BaseException) -> BaseException | None:
    failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> exception
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        if isinstance(first, BaseException):
            return first
    for attr in ("controller_failure", "cause"):  # Ray Train's ControllerError, Ray's RayTaskError
        nxt = getattr(err, attr, None)
        if isinstance(nxt, BaseException) and nxt is not err:
            return nxt
    return err.__cause__


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions below it, outermost first (as far as Ray kept them as objects)."""
    seen: list[BaseException] = []
    while err is not None and all(err is not s for s in seen):
        seen.append(err)
        err = _next_in_chain(err)
    return seen


def _text_lines(message: str) -> str:
    lines = [line.strip() for line in strip_ansi(message).splitlines() if line.strip()]
    text = " ".join(lines)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


def _cause_in_text(text: str) -> str | None:
    """The first exception line of a traceback text that is not Ray's, with its continuation lines (a message
    that spans lines goes on until a blank line)."""
    lines = strip_ansi(text).splitlines()
    for i, line in enumerate(lines):
        m = _EXCEPTION_LINE.match(line)
        if not m or m["type"].startswith("ray."):
            continue
        name = m["type"].rsplit(".", 1)[-1]
        if name in ("UserCodeException", "RayTaskError", "RayActorError"):
            continue
        message = [m["message"] or ""]
        for more in lines[i + 1 :]:
            if not more.strip() or more.startswith(
                ("Traceback (most recent call last)", "The above exception", "During handling of the above exception")
            ):
                break
            message.append(more)
        text = _text_lines("\n".join(message))
        return f"{name}: {text}" if text else name
    return None


def describe_failure(err: BaseException) -> str:
    """One line naming what went wrong at the bottom of ``err``: ``Type: message`` of the first exception in
    its chain that is not Ray's (``IsADirectoryError: [Errno 21] ...``, ``OSError: [Errno 28] No space left on
    device``); for a failure of Ray itself (an actor that died), the first line of Ray's own message."""
    exceptions = chain(err)
    for exc in reversed(exceptions):  # innermost first: the cause, not what wrapped it
        if not _from_ray(exc):
            return f"{type(exc).__name__}: {_text_lines(str(exc))}".rstrip(": ")
    for exc in exceptions:  # Ray kept no object of the original exception: its traceback text names it
        found = _cause_in_text(str(exc))
        if found:
            return found
    inner = exceptions[-1]
    first = next((line.strip() for line in strip_ansi(str(inner)).splitlines() if line.strip()), "")
    return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


def is_run_failure(err: BaseException) -> bool:
    """A failure of the run, not of its input and not a bug of ours: a :class:`~rcat_ray.errors.RunError`, an
    ``OSError`` (a full disk, a store that went away; input files are checked before the run) or an error raised
    by Ray (a task or actor that failed or died, a failed Ray Train run). An input error is not, even where Ray
    carried one from a worker."""
    if isinstance(err, InputError):
        return False
    return isinstance(err, (RunError, OSError)) or _from_ray(err)
