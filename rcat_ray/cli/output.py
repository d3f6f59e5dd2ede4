"""What a command prints besides its result: progress, the log file, one line for a failure or an interrupt."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_INCOMPLETE = 3
#: A run that failed after its inputs were accepted (see :func:`rcat_ray.runtime.failures.is_run_failure`).
EXIT_RUN_FAILED = 4


def add_log_file(path: str) -> None:
    """Progress and log lines also go to ``path`` (appended), with timestamps and without colour codes, and so
    does what the quiet mode holds back from the terminal (lines forwarded from Ray's workers, Ray's own
    warnings and errors, the traceback behind a one-line failure message)."""
    from rcat_ray.runtime.quiet import PlainFormatter, add_log_handler

    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(file)
    handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    logging.getLogger("rcat_ray.core.progress").addHandler(handler)
    add_log_handler(handler)


def configure_output(args: argparse.Namespace) -> None:
    """Progress lines on stderr always; other logs only with ``--verbose``; everything in ``--log-file``."""
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    progress = logging.getLogger("rcat_ray.core.progress")
    progress.setLevel(logging.INFO)
    progress.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    progress.addHandler(console)
    if getattr(args, "log_file", None):
        add_log_file(args.log_file)


#: What an interrupted command kept, for commands whose work is not counted in chunks.
_INTERRUPT_NOTES = {
    "train": "nothing was written (the checkpoint is written when training ends)",
    "finetune": "checkpoints of the finished epochs are kept; run the same command again to resume",
    "sweep": "finished trials and stored evaluation chunks are kept; run the same command with --resume to continue",
    "nightly": "the night was not judged and no history was written; run it again",
    "study": "finished trials, fine-tunes and evaluation chunks are kept; run the same command again to resume",
    "demo": "finished models and evaluation chunks are kept; run the same command again to continue",
}


def interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> int:
    """One line saying what was kept, Ray shut down, and the exit status a shell expects (130 / 143)."""
    from rcat_ray.runtime.environment import shutdown_ray_if_started
    from rcat_ray.runtime.interrupts import EvaluationInterrupted, exit_status, interrupt_signal_name

    if isinstance(err, EvaluationInterrupted) and args.command not in ("sweep", "study"):
        note = str(err)
    else:
        note = _INTERRUPT_NOTES.get(args.command, "finished chunks are stored; run the same command again to continue")
    print(f"interrupted: {note}", file=sys.stderr)
    shutdown_ray_if_started()
    return exit_status(interrupt_signal_name(err))


def one_line(text: str) -> str:
    """A message as one line without colour codes (an exception's text may span lines and carry Ray's colours)."""
    from rcat_ray.runtime.quiet import strip_ansi

    return "; ".join(line.strip() for line in strip_ansi(text).splitlines() if line.strip())


def log_failure(args: argparse.Namespace, err: BaseException) -> None:
    """The whole traceback of a failed run: in the ``--log-file``, and on stderr with ``--verbose``."""
    import traceback

    from rcat_ray.runtime.quiet import LOG_FILE_ONLY, is_terminal, strip_ansi

    LOG_FILE_ONLY.error("rcat-ray %s: the run failed", args.command, exc_info=err)
    if getattr(args, "verbose", False):
        text = "".join(traceback.format_exception(err))
        sys.stderr.write(text if is_terminal(sys.stderr) else strip_ansi(text))


def run_failed(args: argparse.Namespace, err: BaseException) -> int:
    """A run that failed after its inputs were accepted: one line with the cause, exit status 4."""
    from rcat_ray.errors import RunError
    from rcat_ray.runtime.failures import describe_failure

    log_failure(args, err)
    # our own run errors already name their cause (and say what was kept); anything else is described by
    # the exception at the bottom of its chain (the OSError in a worker, not Ray's wrapper around it)
    message = str(err) if isinstance(err, RunError) else describe_failure(err)
    print(f"rcat-ray {args.command}: run failed: {one_line(message)}", file=sys.stderr)
    return EXIT_RUN_FAILED
