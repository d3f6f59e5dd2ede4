"""One handler per ``rcat-ray`` command: build its config, call the capability's ``run``, print the result."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rcat_ray.cli.flags import config_dict
from rcat_ray.cli.output import add_log_file, log_failure, one_line
from rcat_ray.cli.parser import command_config
from rcat_ray.config import DataConfig, parse_config
from rcat_ray.errors import ConfigError
from rcat_ray.evaluate.config import CompareConfig, EvaluateConfig, TableConfig
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.runtime.environment import prepare_local_ray_env
from rcat_ray.study.config import StudyConfig
from rcat_ray.sweep.config import SweepConfig


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
        "sanity": outcome.sanity,
        "attack_noise": outcome.attack_noise,
    }


def _raise_if_incomplete(outcomes: list) -> None:
    from rcat_ray.evaluate.run import raise_if_incomplete

    raise_if_incomplete(outcomes)


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = command_config(args, EvaluateConfig)
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
    cfg = command_config(args, CompareConfig)
    prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.core.flips import format_summary
    from rcat_ray.evaluate.run import run_compare

    outcomes, comparison, prepared = run_compare(cfg)
    for o in outcomes:
        _say(args, o.describe())
    _raise_if_incomplete(outcomes)
    assert comparison is not None  # complete evaluations always give a comparison
    _say(args, format_summary(comparison.summary))
    if comparison.confirmed:
        from rcat_ray.evaluate.confirm import describe_confirmed

        _say(args, describe_confirmed(comparison.confirmed))
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
                "confirmed": comparison.confirmed,
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
    cfg = command_config(args, FinetuneConfig, raw)
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
    cfg = command_config(args, TableConfig)
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
    cfg = command_config(args, SweepConfig)
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


def cmd_study(args: argparse.Namespace) -> int:
    if not args.config:
        raise ConfigError("rcat-ray study needs --config STUDY.yaml (its models, pairs, fine-tune and test settings)")
    cfg = command_config(args, StudyConfig)
    prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.errors import SweepInterruptedError
    from rcat_ray.study.run import check_study_inputs, run_study

    parents = check_study_inputs(cfg)  # before Ray starts
    try:
        outcome = run_study(cfg, parents=parents)
    except SweepInterruptedError as err:  # Tune handles Ctrl+C itself and returns with trials unfinished
        print(
            f"interrupted: {err.args[0].split(';')[0]}; run the same command again to resume the study", file=sys.stderr
        )
        return 130
    _say(args, (outcome.out / "study.md").read_text())
    _say(args, f"written: {', '.join(str(p) for p in outcome.files)}")
    if args.json:
        _emit_json(json.loads((outcome.out / "study.json").read_text()))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    """Exit codes are the contract with cron/CI: 0 pass, 1 a gate failed, 2 the night could not run."""
    import traceback

    from rcat_ray.errors import InputError, RunError
    from rcat_ray.nightly.run import EXIT_COULD_NOT_RUN, run_nightly
    from rcat_ray.runtime.failures import describe_failure, is_run_failure

    try:
        cfg = command_config(args, NightlyConfig)
        prepare_local_ray_env(cfg.compute.address)
        outcome = run_nightly(cfg)
    except InputError as err:
        print(f"rcat-ray nightly: could not run: {err}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    except Exception as err:  # noqa: BLE001 - any crash means "could not run" (2), never "gate failed" (1)
        if is_run_failure(err):  # a worker or the store failed: one line with the cause, the traceback in the log
            log_failure(args, err)
            message = describe_failure(err) if not isinstance(err, RunError) else str(err)
            print(f"rcat-ray nightly: could not run: {one_line(message)}", file=sys.stderr)
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

    cfg = command_config(args, DemoConfig)
    if args.print_config:  # the demo's defaults live in DemoConfig alone; this is their YAML form
        sys.stdout.write(to_yaml(cfg))
        return 0
    prepare_local_ray_env(cfg.compute.address)
    if not args.log_file:  # the demo always keeps its log beside its results
        add_log_file(str(Path(cfg.out) / "demo.log"))
    run_demo(cfg)
    return 0
