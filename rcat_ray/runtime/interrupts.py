"""Ctrl+C and SIGTERM as one exception path, and what an interrupted evaluation tells its caller.

A scheduler stops a job with SIGTERM, a person with Ctrl+C (SIGINT). Python turns only SIGINT into an
exception (``KeyboardInterrupt``); SIGTERM kills the process on the spot, so the Ray actor pool is never
released and the user gets no word about what was kept. :func:`sigterm_as_interrupt` makes SIGTERM raise
:class:`Terminated`, a ``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` that releases resources
handles both signals the same way. The evaluation layer turns either into :class:`EvaluationInterrupted`,
which carries what the CLI prints (how many chunks are stored) and the exit status a shell expects.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the handler of :func:`sigterm_as_interrupt`.

    A ``KeyboardInterrupt`` subclass, so cleanup written for Ctrl+C also runs for SIGTERM, and so no
    ``except Exception`` on the way up mistakes a stop request for a failure.
    """

    signal_name = "SIGTERM"


def interrupt_signal_name(exc: BaseException) -> str:
    """``SIGTERM`` for :class:`Terminated`, else ``SIGINT`` (a plain ``KeyboardInterrupt`` is Ctrl+C)."""
    return getattr(exc, "signal_name", None) or "SIGINT"


def exit_status(signal_name: str) -> int:
    """The status a shell reports for a process stopped by this signal (128 + its number: 130, 143)."""
    return 128 + int(signal.Signals[signal_name])


class EvaluationInterrupted(KeyboardInterrupt):
    """An evaluation stopped by SIGINT or SIGTERM after its actor pool was released.

    ``stored`` of ``total`` chunks (over every model of the call) are in the store; finished chunks are
    written atomically by the actors, and no table was assembled, so running the same command again
    computes only the missing chunks. A ``KeyboardInterrupt`` subclass for the same reason as
    :class:`Terminated`: code that catches ``Exception`` must not turn a stop into an error report.
    """

    def __init__(self, stored: int, total: int, signal_name: str = "SIGINT"):
        self.stored, self.total, self.signal_name = int(stored), int(total), signal_name
        super().__init__(self.stored, self.total, self.signal_name)

    @property
    def exit_code(self) -> int:
        """130 after Ctrl+C, 143 after SIGTERM."""
        return exit_status(self.signal_name)

    def __str__(self) -> str:
        return f"{self.stored} of {self.total} chunks stored; run the same command again to continue"


#: The handler each active :func:`sigterm_as_interrupt` block restores when it ends (innermost last).
_restore_stack: list = []


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("SIGTERM")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the old handler comes back after.

    Signal handlers can only be installed from the main thread; elsewhere (a library caller's worker
    thread) the block runs unchanged, with SIGTERM keeping whatever meaning the process gave it.
    ``ray.init`` installs a SIGTERM handler of its own (``sys.exit``, which no cleanup catches):
    :func:`reclaim_sigterm` puts ours back after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _restore_stack.append(signal.signal(signal.SIGTERM, _raise_terminated))
    try:
        yield
    finally:
        previous = _restore_stack.pop()
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def reclaim_sigterm() -> None:
    """Inside a :func:`sigterm_as_interrupt` block, make SIGTERM raise :class:`Terminated` again after code
    that replaced the handler (``ray.init`` does); the handler found there is the one restored when the
    block ends, so Ray's own shutdown-on-SIGTERM still applies after it. Does nothing outside a block."""
    if not _restore_stack or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is not _raise_terminated:
        _restore_stack[-1] = current
        signal.signal(signal.SIGTERM, _raise_terminated)
