"""Progress lines for long work (training, fine-tuning, evaluation) that read the same in a terminal, in a
pipe (``make demo | tee log``) and in a log file.

A bar that redraws itself is useless in a log; a line per event floods it. So a :class:`Progress` writes one
plain line per finished unit when units are slow, and at most one line every ``interval_s`` seconds when
they are fast, always with done/total, elapsed time and an ETA. Lines go to the ``rcat_ray.core.progress``
logger, which the CLI sends to stderr (and to a log file when asked), so library users decide where they go.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("rcat_ray.core.progress")


def _fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    """Counts finished units of one piece of work and logs a line now and then.

    ``what`` names the work (``evaluate``, ``train old``), ``unit`` the counted thing (``chunks``,
    ``batches``). A line is logged when at least ``interval_s`` seconds passed since the last one, and always
    for the last unit, so a run of any length shows a first sign of life within ``interval_s``.
    """

    def __init__(self, what: str, total: int, unit: str = "", *, interval_s: float = 10.0, done: int = 0):
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.interval_s = interval_s
        self.done = int(done)  # units already finished before this run (resumed work)
        self._start_done = self.done
        self._t0 = time.monotonic()
        self._last = self._t0
        self._closed = False

    def line(self, extra: str = "") -> str:
        """The current state as one line: done/total, percent, elapsed, ETA (from this run's own rate)."""
        elapsed = time.monotonic() - self._t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        new = self.done - self._start_done
        eta = ""
        if new > 0 and self.done < self.total:
            eta = f", ETA {_fmt_seconds(elapsed / new * (self.total - self.done))}"
        unit = f" {self.unit}" if self.unit else ""
        tail = f"; {extra}" if extra else ""
        return f"[{self.what}] {self.done}/{self.total}{unit} ({pct:.0f}%), {_fmt_seconds(elapsed)} elapsed{eta}{tail}"

    def update(self, n: int = 1, extra: str = "") -> None:
        """Record ``n`` more finished units; log a line when it is time to (or when the work is complete)."""
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.interval_s:
            self._last = now
            log.info(self.line(extra))

    def close(self, extra: str = "") -> None:
        """Log the final line once, if the last update did not already say everything was done."""
        if self._closed:
            return
        self._closed = True
        if self.done < self.total or extra:
            log.info(self.line(extra))
