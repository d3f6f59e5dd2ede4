"""``rcat-ray``: parse, run the command's handler, and map what stops it to the documented exit codes."""

from __future__ import annotations

import logging
import os
import sys

from rcat_ray.cli import commands
from rcat_ray.cli.output import EXIT_INCOMPLETE, configure_output, interrupted, run_failed
from rcat_ray.cli.parser import build_parser

__all__ = ["main", "run"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rcat_ray.runtime.quiet import configure_quiet

    configure_quiet(getattr(args, "verbose", False))
    configure_output(args)
    from rcat_ray.errors import IncompleteRunError, InputError
    from rcat_ray.runtime.failures import is_run_failure
    from rcat_ray.runtime.interrupts import sigterm_as_interrupt

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        with sigterm_as_interrupt():
            return handler(args)
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM (raised as a KeyboardInterrupt by the handler)
        return interrupted(args, err)
    except BrokenPipeError:  # `rcat-ray ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except InputError as err:
        print(f"rcat-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except IncompleteRunError as err:
        print(f"rcat-ray {args.command}: {err}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except Exception as err:
        if not is_run_failure(err):  # a bug: its traceback is what helps
            raise
        return run_failed(args, err)


def run() -> None:
    """The ``rcat-ray`` console script: :func:`main`, then the process ends with its exit status.

    A run that never started Ray (store, report, data, a compare of stored tables, input errors) leaves without
    the interpreter's teardown, once its output is flushed: with pyarrow 26 and torch 2.14 in one process,
    that teardown aborts now and then after all the work is done ("terminate called without an active
    exception", exit 134; 4 of 16 runs of ``rcat-ray store show`` here). Ray's own shutdown needs the normal
    exit, so a run that started Ray takes it.
    """
    code = main()
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
