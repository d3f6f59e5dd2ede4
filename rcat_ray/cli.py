"""``rcat-ray <command>``: parse a YAML config and flags into a typed config, then call the workflows.

Every key of a command's config is a flag (``--attack.n_iter``), derived from the config models with their
help; short aliases (``--eps``) cover the common keys; flags override the YAML file. Exit codes are a
contract with scripts and schedulers: 0 done, 1 a nightly gate failed, 2 input that cannot run (one clear
message, before Ray starts), 3 an incomplete run that the same command continues, 4 a run that failed after
its inputs were accepted (one line with the cause; what finished is kept), 130 / 143 interrupted by Ctrl+C /
SIGTERM. ``nightly`` keeps its own contract (0 pass, 1 a gate failed, 2 the night could not run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rcat_ray.cli_flags import Alias, Flag, add_config_flags, config_dict, config_flags, parse_model_spec
from rcat_ray.config import DataConfig, parse_config
from rcat_ray.errors import ConfigError
from rcat_ray.evaluate.config import CompareConfig, EvaluateConfig, TableConfig
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.runtime.environment import prepare_local_ray_env
from rcat_ray.sweep.config import SweepConfig

__all__ = ["build_parser", "main", "parse_model_spec", "run"]

EXIT_INCOMPLETE = 3
#: A run that failed after its inputs were accepted (see :func:`rcat_ray.runtime.failures.is_run_failure`).
EXIT_RUN_FAILED = 4

#: Short flags of the ``compute`` section, the same keys in every command that has one.
_COMPUTE_ALIASES = (
    Alias("--address", "compute.address"),
    Alias("--workers", "compute.num_workers"),
    Alias("--cpus-per-worker", "compute.cpus_per_worker"),
    Alias("--gpus-per-worker", "compute.gpus_per_worker"),
    Alias("--threads-per-worker", "compute.threads_per_worker"),
    Alias("--local-cpus", "compute.local_cpus"),
)

#: Short flags of the evaluation settings (evaluate, compare, table, nightly).
_SETTING_ALIASES = (
    Alias("--data", "data.name"),
    Alias("--data-root", "data.root"),
    Alias("--data-path", "data.path"),
    Alias("--split", "data.split"),
    Alias("--offset", "data.offset"),
    Alias("--limit", "data.limit"),
    Alias("--norm", "attack.norm"),
    Alias("--eps", "attack.eps"),
    Alias("--attacks", "attack.attacks"),
    Alias("--n-iter", "attack.n_iter"),
    Alias("--seed", "attack.seed"),
    Alias("--robust-samples", "attack.robust_samples"),
    Alias("--chunk-size", "chunk_size"),
    Alias("--store", "store"),
    Alias("--max-new-chunks", "max_new_chunks"),
    *_COMPUTE_ALIASES,
    Alias("--device", "compute.device"),
)

_FINETUNE_ALIASES = (
    Alias("--old", "old", "spec"),
    Alias("--new", "new", "spec"),
    Alias("--loss", "loss.kind"),
    Alias("--alpha", "loss.alpha"),
    Alias("--beta", "loss.beta"),
    Alias("--train-eps", "train_attack.eps"),
    Alias("--train-attack", "train_attack.kind"),
    Alias("--epochs", "epochs"),
    Alias("--batch-size", "batch_size"),
    Alias("--lr", "optimizer.lr"),
    Alias("--data", "data.name"),
    Alias("--data-root", "data.root"),
    Alias("--data-path", "data.path"),
    Alias("--limit", "data.limit"),
    Alias("--seed", "seed"),
    Alias("--name", "name"),
    Alias("--out", "out"),
    Alias("--output", "output"),
    Alias("--storage", "storage"),
    Alias("--store", "store"),
    Alias("--augment", "augment"),
    *_COMPUTE_ALIASES,
)

_TRAIN_ALIASES = (
    Alias("--data", "data.name"),
    Alias("--data-root", "data.root"),
    Alias("--arch", "recipe.arch"),
    Alias("--epochs", "recipe.epochs"),
    Alias("--train-samples", "recipe.train_samples"),
    Alias("--batch-size", "recipe.batch_size"),
    Alias("--eps", "recipe.eps"),
    Alias("--lr", "recipe.lr"),
    Alias("--schedule", "recipe.schedule"),
    Alias("--seed", "recipe.seed"),
)

#: A missing section whose only required key has a flag is reported by that flag (``--eps is required``).
_SECTION_FLAGS = {"attack": "attack.eps", "train_attack": "train_attack.eps"}


def _add_output_flags(p: argparse.ArgumentParser, *, json_flag: bool = False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's and the libraries' own logs")
    p.add_argument("--log-file", help="also append progress and log lines to this file")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (logs go to stderr)")


def _add_config(
    p: argparse.ArgumentParser, flags: dict[str, Flag], aliases: tuple[Alias, ...], *, config_help: str = ""
) -> None:
    """``--config`` plus every key of the command's config as a flag; the parse needs them back (``_cfg``)."""
    p.usage = "%(prog)s [--config YAML] [options]"
    p.add_argument("--config", help=config_help or "YAML config file (flags override it)")
    named = add_config_flags(p, flags, aliases)
    named |= {section: named[key] for section, key in _SECTION_FLAGS.items() if key in named}
    p.set_defaults(_flags=flags, _aliases=aliases, _named=named)


def _parse(args: argparse.Namespace, cls: type[BaseModel], raw: dict[str, Any] | None = None) -> Any:
    """The command's config from ``--config`` and the flags; errors name the flag the user typed."""
    if raw is None:
        raw = config_dict(args, args._flags, args._aliases)
    return parse_config(cls, raw, flags=args._named)


def build_parser() -> argparse.ArgumentParser:
    from rcat_ray.demo import DemoConfig
    from rcat_ray.finetune.pretrain import TrainRecipe

    parser = argparse.ArgumentParser(prog="rcat-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rcat-ray {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="attack each model once and store its per-sample table")
    _add_config(ev, config_flags(EvaluateConfig), (*_SETTING_ALIASES, Alias("--model", "models", "spec", True)))
    _add_output_flags(ev, json_flag=True)

    cmp_ = sub.add_parser("compare", help="evaluate old and new (cached when possible) and compute flips")
    extra = (
        Alias("--old", "old", "spec"),
        Alias("--new", "new", "spec"),
        Alias("--bootstrap", "bootstrap.n_resamples"),
        Alias("--report", "report"),
    )
    _add_config(cmp_, config_flags(CompareConfig), (*_SETTING_ALIASES, *extra))
    _add_output_flags(cmp_, json_flag=True)

    rep = sub.add_parser("report", help="write the HTML report of a stored comparison")
    rep.add_argument("--store", default="results", help="result store (default: results)")
    rep.add_argument("--comparison", required=True, help="comparison key, any unique prefix of it, or its folder")
    rep.add_argument("--out", default="report", help="output folder")
    rep.add_argument("--top-k", type=int, default=8, help="flipped samples to show")
    _add_output_flags(rep)

    st = sub.add_parser("store", help="list, show and verify what a result store holds")
    st_sub = st.add_subparsers(dest="store_command", required=True)
    for name, helptext in (
        ("ls", "tables and comparisons: models, data, attack, N, created-at"),
        ("show", "one table (accuracy, robust accuracy) or comparison (summary) by key or unique key prefix"),
        ("verify", "check every artifact and sample set against the checksums recorded for it"),
    ):
        sp = st_sub.add_parser(name, help=helptext)
        if name == "show":
            sp.add_argument("key", help="a key or any unique prefix of one")
        sp.add_argument("--store", default="results", help="result store, a path or a URI (default: results)")
        if name == "verify":
            sp.add_argument(
                "--repair",
                action="store_true",
                help="move damaged artifacts and sample sets aside "
                "so runs recompute them; remove leftovers of killed sample set preparations",
            )
        _add_output_flags(sp, json_flag=True)

    da = sub.add_parser("data", help="prepare a selection of samples once, as a set every node can read")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    prep = da_sub.add_parser("prepare", help="store the selected samples (uint8, chunk-aligned Parquet) in the store")
    data_aliases = tuple(a for a in _SETTING_ALIASES if a.key.startswith("data."))
    _add_config(prep, config_flags(DataConfig, "data."), data_aliases, config_help="YAML with a 'data' section")
    prep.add_argument("--store", default="results", help="result store that keeps the set under samples/")
    prep.add_argument("--dest", help="a folder or URI for the set instead of the store's samples/ folder")
    prep.add_argument("--rows-per-group", type=int, default=256, help="rows per Parquet row group (a chunk's reads)")
    _add_output_flags(prep, json_flag=True)

    ft = sub.add_parser("finetune", help="fine-tune the new model (RCAT, PCT, PCAT, AT) on Ray Train")
    _add_config(ft, config_flags(FinetuneConfig), _FINETUNE_ALIASES)
    _add_output_flags(ft)

    tab = sub.add_parser("table", help="the paper-style table of one or more pairs (Markdown, LaTeX, CSV)")
    _add_config(tab, config_flags(TableConfig), (*_SETTING_ALIASES, Alias("--out", "out")))
    _add_output_flags(tab, json_flag=True)

    sw = sub.add_parser("sweep", help="search the fine-tuning weights/eps with Ray Tune, choose, evaluate")
    sweep_aliases = (
        Alias("--mode", "mode"),
        Alias("--num-samples", "num_samples"),
        Alias("--out", "out"),
        *_COMPUTE_ALIASES,
    )
    _add_config(sw, config_flags(SweepConfig), sweep_aliases, config_help="YAML sweep config (required)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials kept)")
    _add_output_flags(sw)

    ni = sub.add_parser("nightly", help="gate a candidate against the production model (exit 0 pass, 1 fail, 2 error)")
    extra = (
        Alias("--baseline", "baseline", "spec"),
        Alias("--candidate", "candidate", "spec"),
        Alias("--candidate-dir", "candidate_dir"),
        Alias("--history", "history"),
        Alias("--date", "date"),
        Alias("--out", "out"),
    )
    _add_config(ni, config_flags(NightlyConfig), (*_SETTING_ALIASES, *extra))
    _add_output_flags(ni, json_flag=True)

    tr = sub.add_parser("train", help="adversarially train a built-in architecture from scratch (FGSM-RS)")
    train_flags = config_flags(DataConfig, "data.") | config_flags(TrainRecipe, "recipe.")
    _add_config(tr, train_flags, _TRAIN_ALIASES, config_help="YAML with 'data' and 'recipe' (flags override it)")
    tr.add_argument("--out", required=True, help="checkpoint to write (*.pt)")
    _add_output_flags(tr)

    demo = sub.add_parser("demo", help="the embedded default: train old/new on Fashion-MNIST, compare, report")
    demo_aliases = (
        Alias("--out", "out"),
        Alias("--test-samples", "test_samples"),
        *_COMPUTE_ALIASES,
    )
    _add_config(demo, config_flags(DemoConfig), demo_aliases, config_help="YAML overriding the demo defaults")
    demo.add_argument("--print-config", action="store_true", help="print the demo's full config as YAML and stop")
    _add_output_flags(demo)
    return parser


def _version() -> str:
    try:
        return metadata.version("rcat_ray")
    except metadata.PackageNotFoundError:
        return "unknown"


def _say(args: argparse.Namespace, text: str) -> None:
    """Human-readable output: stdout, or stderr when stdout carries the JSON result."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, allow_nan=False))


def _outcome_json(outcome: Any) -> dict[str, Any]:
    return {
        "model": outcome.model_name,
        "key": outcome.key,
        "complete": outcome.complete,
        "chunks": outcome.n_chunks,
        "chunks_computed": outcome.chunks_computed,
        "chunks_reused": outcome.chunks_cached,
        "accuracy": outcome.accuracy,
    }


def _raise_if_incomplete(outcomes: list) -> None:
    from rcat_ray.evaluate.run import raise_if_incomplete

    raise_if_incomplete(outcomes)


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _parse(args, EvaluateConfig)
    prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.evaluate.run import run_evaluate

    outcomes, _ = run_evaluate(cfg)
    for o in outcomes:
        _say(args, o.describe())
    if args.json:
        _emit_json({"store": cfg.store, "tables": [_outcome_json(o) for o in outcomes]})
    _raise_if_incomplete(outcomes)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    cfg = _parse(args, CompareConfig)
    prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.core.flips import format_summary
    from rcat_ray.evaluate.run import run_compare

    outcomes, comparison, prepared = run_compare(cfg)
    for o in outcomes:
        _say(args, o.describe())
    _raise_if_incomplete(outcomes)
    assert comparison is not None  # complete evaluations always give a comparison
    _say(args, format_summary(comparison.summary))
    _say(args, f"comparison {comparison.key} stored in {prepared.store.path(comparison.folder)}")
    report = None
    if cfg.report:
        from rcat_ray.report.flip_report import write_report

        report = write_report(prepared.store, comparison.key, cfg.report)
        _say(args, f"report: {report}")
    if args.json:
        _emit_json(
            {
                "comparison": comparison.key,
                "store": cfg.store,
                "old": outcomes[0].model_name,
                "new": outcomes[1].model_name,
                "tables": [_outcome_json(o) for o in outcomes],
                "summary": comparison.summary,
                "report": str(report) if report else None,
            }
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rcat_ray.report.flip_report import write_report
    from rcat_ray.report.inventory import resolve_key
    from rcat_ray.store.result_store import ResultStore

    store = ResultStore(args.store)
    key = resolve_key(store, Path(args.comparison.rstrip("/")).name, kind="comparison")
    print(f"report: {write_report(store, key, args.out, top_k=args.top_k)}")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from rcat_ray.report.inventory import describe_entry, list_entries, resolve_key, verify_store
    from rcat_ray.store.result_store import ResultStore

    store = ResultStore(args.store)
    if args.store_command == "ls":
        entries = list_entries(store)
        if args.json:
            _emit_json(entries)
        else:
            print(_entries_text(entries, store.uri))
        return 0
    if args.store_command == "show":
        info = describe_entry(store, resolve_key(store, args.key))
        if args.json:
            _emit_json(info)
        else:
            print(_mapping_text(info))
        return 0
    findings = verify_store(store, repair=args.repair)
    if args.json:
        _emit_json(findings)
    else:
        for f in findings:
            print(_mapping_text(f, one_line=True))
        moved = sum(1 for f in findings if f.get("moved_to"))
        removed = sum(1 for f in findings if f.get("removed"))
        print(
            f"{len(findings)} problem(s) found"
            + (f"; {moved} damaged artifact(s) moved aside" if moved else "")
            + (f"; {removed} leftover folder(s) removed" if removed else "")
        )
    damaged = [
        f for f in findings if f.get("status") in ("damaged", "orphan") and not (f.get("moved_to") or f.get("removed"))
    ]
    return 1 if damaged else 0


def _entries_text(entries: list[dict[str, Any]], where: str) -> str:
    if not entries:
        return f"store {where} holds no tables or comparisons"
    lines = []
    for e in entries:
        fields = [str(e.get(k)) for k in ("kind", "key", "models", "data", "attack", "n", "created_at") if e.get(k)]
        lines.append("  ".join(fields))
    return "\n".join(lines)


def _mapping_text(obj: Any, *, one_line: bool = False, indent: int = 0) -> str:
    """A nested mapping as indented ``key: value`` lines (or one line), for the human form of store output."""
    if not isinstance(obj, dict):
        return " " * indent + str(obj)
    if one_line:
        return ", ".join(f"{k}: {v}" for k, v in obj.items())
    lines = []
    for k, v in obj.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(_mapping_text(v, indent=indent + 2))
        else:
            lines.append(" " * indent + f"{k}: {v}")
    return "\n".join(lines)


def cmd_data(args: argparse.Namespace) -> int:
    from rcat_ray.config import resolve_local_path
    from rcat_ray.core.samples import open_samples, prepare_samples, samples_location

    raw = config_dict(args, args._flags, args._aliases)
    named = {k.removeprefix("data."): f for k, f in args._named.items()}
    data = parse_config(DataConfig, raw.get("data", {}), flags=named)
    dest = resolve_local_path(args.dest) if args.dest else samples_location(resolve_local_path(args.store), data)
    info = prepare_samples(data, dest, rows_per_group=args.rows_per_group)
    summary = {
        "location": dest,
        "dataset": info.dataset,
        "split": info.split,
        "n_samples": info.num_rows,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "fingerprint": info.fingerprint,
        "preprocessing": info.preprocessing,
        "parts": len(open_samples(dest).files),
    }
    if args.json:
        _emit_json(summary)
    else:
        print(_mapping_text(summary))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    raw = config_dict(args, args._flags, args._aliases)
    if any(k.startswith("data.") and getattr(args, k) is not None for k in args._flags):
        raw["data"].setdefault("split", "train")  # data named by flags: the training split unless told
    cfg = _parse(args, FinetuneConfig, raw)
    prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.finetune.run import check_finetune_inputs

    parents = check_finetune_inputs(cfg)  # models, data, shapes, weights, output path: before Ray starts
    from rcat_ray.finetune.run import run_finetune
    from rcat_ray.runtime.cluster import ensure_ray

    identity = parents.identity(cfg)
    print(f"fine-tune {identity.run_name(cfg)} (identity {identity.digest})")
    if cfg.compute.num_workers > 0 and parents.finished is None:  # one found at its output path needs no Ray
        ensure_ray(cfg.compute)
    outcome = run_finetune(cfg, parents=parents)
    last = outcome.history[-1] if outcome.history else {}
    shown = {k: round(v, 4) for k, v in last.items() if k.startswith(("val_", "train_loss"))}
    done = "already fine-tuned with this identity, reused" if outcome.reused else "fine-tuned model"
    print(f"{done}: {outcome.checkpoint} (fingerprint {outcome.fingerprint})")
    print(f"last epoch: {shown}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    cfg = _parse(args, TableConfig)
    prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.evaluate.paper_table import to_markdown, to_records
    from rcat_ray.evaluate.run import run_table

    tables = run_table(cfg)
    _say(args, to_markdown(tables))
    _say(args, f"written: {cfg.out}/table.md, table.tex, table.csv")
    if args.json:
        _emit_json({"out": cfg.out, "pairs": to_records(tables)})
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if not args.config:
        raise ConfigError("rcat-ray sweep needs --config SWEEP.yaml (its 'base' fine-tune and the space)")
    cfg = _parse(args, SweepConfig)
    prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.finetune.run import check_finetune_inputs

    parents = check_finetune_inputs(cfg.base)  # before Ray starts
    from rcat_ray.errors import SweepInterruptedError
    from rcat_ray.runtime.cluster import ensure_ray
    from rcat_ray.sweep.run import run_sweep

    # a TorchTrainer per trial (pattern B) needs the dashboard's state API when ASHA stops a trial
    ensure_ray(cfg.compute, dashboard=cfg.base.compute.num_workers > 1)
    try:
        outcome = run_sweep(cfg, resume=args.resume, parents=parents)
    except SweepInterruptedError as err:  # Tune handles Ctrl+C itself and returns with trials unfinished
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    c = outcome.chosen
    if outcome.validation is not None:
        print(f"chosen on: {outcome.validation.describe()}")
    print(f"{len(outcome.trials)} trials; new model's validation robust accuracy {100 * outcome.new_val_rob_acc:.2f}%")
    print(
        f"chosen trial {c['trial_id']}: {c['kind']} alpha={c['alpha']} beta={c['beta']}, "
        f"val S-NFR {100 * c['val_s_nfr']:.2f}%, val robust acc {100 * c['val_rob_acc']:.2f}%"
    )
    print(f"written: {outcome.out}/trials.parquet, best.yaml, pareto.png, report.html; model {outcome.checkpoint}")
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    """Exit codes are the contract with cron/CI: 0 pass, 1 a gate failed, 2 the night could not run."""
    import traceback

    from rcat_ray.errors import InputError, RunError
    from rcat_ray.nightly.run import EXIT_COULD_NOT_RUN, run_nightly
    from rcat_ray.runtime.failures import describe_failure, is_run_failure

    try:
        cfg = _parse(args, NightlyConfig)
        prepare_local_ray_env(cfg.compute.address)
        outcome = run_nightly(cfg)
    except InputError as err:
        print(f"rcat-ray nightly: could not run: {err}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    except Exception as err:  # noqa: BLE001 - any crash means "could not run" (2), never "gate failed" (1)
        if is_run_failure(err):  # a worker or the store failed: one line with the cause, the traceback in the log
            _log_failure(args, err)
            message = describe_failure(err) if not isinstance(err, RunError) else str(err)
            print(f"rcat-ray nightly: could not run: {_one_line(message)}", file=sys.stderr)
            return EXIT_COULD_NOT_RUN
        traceback.print_exc()
        print("rcat-ray nightly: could not run (unexpected error above)", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    _say(args, f"verdict: {outcome.verdict_path}; report: {outcome.report}")
    if args.json:
        _emit_json(outcome.verdict)
    return outcome.exit_code


def cmd_train(args: argparse.Namespace) -> int:
    from rcat_ray.config import DataConfig
    from rcat_ray.finetune.pretrain import TrainRecipe, train_checkpoint

    raw = config_dict(args, args._flags, args._aliases)
    data = parse_config(
        DataConfig, raw.get("data", {}), flags={k.removeprefix("data."): v for k, v in args._named.items()}
    )
    recipe = parse_config(
        TrainRecipe, raw.get("recipe", {}), flags={k.removeprefix("recipe."): v for k, v in args._named.items()}
    )
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists; choose another --out (checkpoints are never overwritten)")
    train_checkpoint(recipe, data, out, out.stem)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rcat_ray.config import to_yaml
    from rcat_ray.demo import DemoConfig, run_demo

    cfg = _parse(args, DemoConfig)
    if args.print_config:  # the demo's defaults live in DemoConfig alone; this is their YAML form
        sys.stdout.write(to_yaml(cfg))
        return 0
    prepare_local_ray_env(cfg.compute.address)
    if not args.log_file:  # the demo always keeps its log beside its results
        _add_log_file(str(Path(cfg.out) / "demo.log"))
    run_demo(cfg)
    return 0


def _add_log_file(path: str) -> None:
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


def _configure_output(args: argparse.Namespace) -> None:
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
        _add_log_file(args.log_file)


#: What an interrupted command kept, for commands whose work is not counted in chunks.
_INTERRUPT_NOTES = {
    "train": "nothing was written (the checkpoint is written when training ends)",
    "finetune": "checkpoints of the finished epochs are kept; run the same command again to resume",
    "sweep": "finished trials and stored evaluation chunks are kept; run the same command with --resume to continue",
    "nightly": "the night was not judged and no history was written; run it again",
    "demo": "finished models and evaluation chunks are kept; run the same command again to continue",
}


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> int:
    """One line saying what was kept, Ray shut down, and the exit status a shell expects (130 / 143)."""
    from rcat_ray.runtime.environment import shutdown_ray_if_started
    from rcat_ray.runtime.interrupts import EvaluationInterrupted, exit_status, interrupt_signal_name

    if isinstance(err, EvaluationInterrupted) and args.command != "sweep":
        note = str(err)
    else:
        note = _INTERRUPT_NOTES.get(args.command, "finished chunks are stored; run the same command again to continue")
    print(f"interrupted: {note}", file=sys.stderr)
    shutdown_ray_if_started()
    return exit_status(interrupt_signal_name(err))


def _one_line(text: str) -> str:
    """A message as one line without colour codes (an exception's text may span lines and carry Ray's colours)."""
    from rcat_ray.runtime.quiet import strip_ansi

    return "; ".join(line.strip() for line in strip_ansi(text).splitlines() if line.strip())


def _log_failure(args: argparse.Namespace, err: BaseException) -> None:
    """The whole traceback of a failed run: in the ``--log-file``, and on stderr with ``--verbose``."""
    import traceback

    from rcat_ray.runtime.quiet import LOG_FILE_ONLY, is_terminal, strip_ansi

    LOG_FILE_ONLY.error("rcat-ray %s: the run failed", args.command, exc_info=err)
    if getattr(args, "verbose", False):
        text = "".join(traceback.format_exception(err))
        sys.stderr.write(text if is_terminal(sys.stderr) else strip_ansi(text))


def _run_failed(args: argparse.Namespace, err: BaseException) -> int:
    """A run that failed after its inputs were accepted: one line with the cause, exit status 4."""
    from rcat_ray.errors import RunError
    from rcat_ray.runtime.failures import describe_failure

    _log_failure(args, err)
    # our own run errors already name their cause (and say what was kept); anything else is described by
    # the exception at the bottom of its chain (the OSError in a worker, not Ray's wrapper around it)
    message = str(err) if isinstance(err, RunError) else describe_failure(err)
    print(f"rcat-ray {args.command}: run failed: {_one_line(message)}", file=sys.stderr)
    return EXIT_RUN_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rcat_ray.runtime.quiet import configure_quiet

    configure_quiet(getattr(args, "verbose", False))
    _configure_output(args)
    from rcat_ray.errors import IncompleteRunError, InputError
    from rcat_ray.runtime.failures import is_run_failure
    from rcat_ray.runtime.interrupts import sigterm_as_interrupt

    handlers = {
        "evaluate": cmd_evaluate,
        "compare": cmd_compare,
        "report": cmd_report,
        "store": cmd_store,
        "data": cmd_data,
        "train": cmd_train,
        "finetune": cmd_finetune,
        "table": cmd_table,
        "sweep": cmd_sweep,
        "nightly": cmd_nightly,
        "demo": cmd_demo,
    }
    try:
        with sigterm_as_interrupt():
            return handlers[args.command](args)
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM (raised as a KeyboardInterrupt by the handler)
        return _interrupted(args, err)
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
        return _run_failed(args, err)


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


if __name__ == "__main__":
    run()
