"""``rcat-ray <command>``: parse a YAML config and flags into a typed config, then call the workflows.

Every key of a command's config is a flag (``--attack.n_iter``), derived from the config models with their
help; short aliases (``--eps``) cover the common keys; flags override the YAML file. Exit codes are a
contract with scripts and schedulers: 0 done, 1 a nightly gate failed, 2 input that cannot run (one clear
message, before Ray starts), 3 an incomplete run that the same command continues, 4 a run that failed after
its inputs were accepted (one line with the cause; what finished is kept), 130 / 143 interrupted by Ctrl+C /
SIGTERM. ``nightly`` keeps its own contract (0 pass, 1 a gate failed, 2 the night could not run).
"""

from __future__ import annotations

from rcat_ray.cli.flags import parse_model_spec
from rcat_ray.cli.main import main, run
from rcat_ray.cli.output import EXIT_INCOMPLETE, EXIT_RUN_FAILED
from rcat_ray.cli.parser import build_parser

__all__ = ["EXIT_INCOMPLETE", "EXIT_RUN_FAILED", "build_parser", "main", "parse_model_spec", "run"]
