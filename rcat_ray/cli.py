"""``rcat-ray <command>``: parse a YAML config and flags into a typed config, then call the workflows.

Every flag is a shortcut for a config key (shown in ``--help``); flags override the YAML file. Input
errors exit with status 2 and one clear message, before Ray starts or any attack runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rcat_ray.config import (
    CompareConfig,
    ComputeConfig,
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    NightlyConfig,
    SweepConfig,
    TableConfig,
    deep_merge,
    load_yaml,
    parse_config,
)

#: flag -> (dotted config key, type, help). Shared by evaluate and compare.
_SETTING_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--data": ("data.name", str, "dataset: fashion_mnist, digits, cifar10, cifar100, tensors"),
    "--data-root": ("data.root", str, "dataset folder"),
    "--data-path": ("data.path", str, "file of a 'tensors' dataset"),
    "--split": ("data.split", str, "train, val or test"),
    "--offset": ("data.offset", int, "skip this many samples of the split"),
    "--limit": ("data.limit", int, "evaluate at most this many samples"),
    "--norm": ("attack.norm", str, "Linf or L2"),
    "--eps": ("attack.eps", float, "perturbation budget, [0,1] pixel units"),
    "--attacks": ("attack.attacks", "csv", "comma-separated cascade: apgd-ce,apgd-dlr,apgd-t,fab-t,square|standard"),
    "--n-iter": ("attack.n_iter", int, "iterations per attack"),
    "--seed": ("attack.seed", int, "attack seed"),
    "--robust-samples": ("attack.robust_samples", int, "attack only the first N samples"),
    "--chunk-size": ("chunk_size", int, "samples per work unit"),
    "--store": ("store", str, "result store (path or URI)"),
    "--max-new-chunks": ("max_new_chunks", int, "stop after this many new chunks"),
    "--address": ("compute.address", str, "Ray address of a running cluster (default: start a local one)"),
    "--workers": ("compute.num_workers", int, "evaluation actors"),
    "--cpus-per-worker": ("compute.cpus_per_worker", float, "CPUs per actor"),
    "--gpus-per-worker": ("compute.gpus_per_worker", float, "GPUs per actor"),
    "--threads-per-worker": ("compute.threads_per_worker", int, "torch threads per actor"),
    "--device": ("compute.device", str, "auto, cpu or cuda"),
    "--local-cpus": ("compute.local_cpus", int, "CPUs of the local Ray instance"),
}


_FINETUNE_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--old": ("old", "spec", "old model spec"),
    "--new": ("new", "spec", "new model spec"),
    "--loss": ("loss.kind", str, "rcat, pct, pcat or at"),
    "--alpha": ("loss.alpha", float, "constraint weight alpha"),
    "--beta": ("loss.beta", float, "constraint weight beta"),
    "--train-eps": ("train_attack.eps", float, "training attack eps"),
    "--train-attack": ("train_attack.kind", str, "fgsm-rs, pgd or paper"),
    "--epochs": ("epochs", int, "epochs"),
    "--batch-size": ("batch_size", int, "batch size per worker"),
    "--lr": ("optimizer.lr", float, "learning rate"),
    "--workers": ("num_workers", int, "Ray Train workers (0 = in-process)"),
    "--use-gpu": ("use_gpu", bool, "one GPU per worker"),
    "--out": ("out", str, "folder of the final checkpoint"),
    "--address": ("address", str, "Ray address"),
}


def parse_model_spec(spec: str) -> dict[str, Any]:
    """``robustbench:NAME``, ``builtin:ARCH``, ``checkpoint:PATH`` or a bare ``*.pt``/``*.pth`` path."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("robustbench", "builtin"):
        return {"source": kind, "name": rest}
    if sep and kind in ("checkpoint", "ckpt"):
        return {"source": "checkpoint", "name": Path(rest).stem, "path": rest}
    if spec.endswith((".pt", ".pth")):
        return {"source": "checkpoint", "name": Path(spec).stem, "path": spec}
    raise ConfigError(
        f"cannot read model spec '{spec}': use robustbench:NAME, builtin:ARCH or checkpoint:PATH (or a .pt path)"
    )


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (flags override it)")
    for flag, (key, typ, helptext) in _SETTING_FLAGS.items():
        p.add_argument(flag, dest=key, type=str if typ == "csv" else typ, default=None, help=f"{helptext} [{key}]")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def _settings_dict(args: argparse.Namespace) -> dict[str, Any]:
    base = load_yaml(args.config) if args.config else {}
    over: dict[str, Any] = {}
    for _flag, (key, typ, _h) in _SETTING_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            _set_dotted(over, key, [a.strip() for a in value.split(",") if a.strip()] if typ == "csv" else value)
    return deep_merge(base, over)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcat-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="attack each model once and store its per-sample table")
    _add_setting_flags(ev)
    ev.add_argument("--model", action="append", default=[], metavar="SPEC", help="model spec (repeatable) [models]")

    cmp_ = sub.add_parser("compare", help="evaluate old and new (cached when possible) and compute flips")
    _add_setting_flags(cmp_)
    cmp_.add_argument("--old", metavar="SPEC", help="old model spec [old]")
    cmp_.add_argument("--new", metavar="SPEC", help="new model spec [new]")
    cmp_.add_argument(
        "--bootstrap", type=int, dest="bootstrap.n_resamples", help="bootstrap resamples [bootstrap.n_resamples]"
    )
    cmp_.add_argument("--report", help="also write the HTML report into this folder [report]")

    rep = sub.add_parser("report", help="write the HTML report of a stored comparison")
    rep.add_argument("--store", default="results", help="result store")
    rep.add_argument("--comparison", required=True, help="comparison key (or its folder in the store)")
    rep.add_argument("--out", default="report", help="output folder")
    rep.add_argument("--top-k", type=int, default=8, help="flipped samples to show")

    ft = sub.add_parser("finetune", help="fine-tune the new model (RCAT, PCT, PCAT, AT) on Ray Train")
    ft.add_argument("--config", help="YAML config file (flags override it)")
    for flag, (key, typ, helptext) in _FINETUNE_FLAGS.items():
        if typ is bool:
            ft.add_argument(flag, dest=key, action="store_true", default=None, help=f"{helptext} [{key}]")
        else:
            ft.add_argument(
                flag, dest=key, type=str if typ == "spec" else typ, default=None, help=f"{helptext} [{key}]"
            )
    ft.add_argument("-v", "--verbose", action="store_true", help="log progress details")

    tab = sub.add_parser("table", help="the paper-style table of one or more pairs (Markdown, LaTeX, CSV)")
    _add_setting_flags(tab)
    tab.add_argument("--out", dest="out", help="output folder [out]")

    sw = sub.add_parser("sweep", help="search the fine-tuning weights/eps with Ray Tune, choose, evaluate")
    sw.add_argument("--config", required=True, help="YAML sweep config")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials kept)")
    sw.add_argument("--mode", dest="mode", help="grid or search [mode]")
    sw.add_argument("--num-samples", dest="num_samples", type=int, help="trials in search mode [num_samples]")
    sw.add_argument("--out", dest="out", help="output folder [out]")
    sw.add_argument("--address", dest="address", help="Ray address [address]")
    sw.add_argument("-v", "--verbose", action="store_true", help="log progress details")

    ni = sub.add_parser("nightly", help="gate a candidate against the production model (exit 0 pass, 1 fail, 2 error)")
    _add_setting_flags(ni)
    ni.add_argument("--baseline", metavar="SPEC", help="production model spec [baseline]")
    ni.add_argument("--candidate", metavar="SPEC", help="candidate model spec [candidate]")
    ni.add_argument("--candidate-dir", dest="candidate_dir", help="newest *.pt in this folder [candidate_dir]")
    ni.add_argument("--history", dest="history", help="history dataset folder or URI [history]")
    ni.add_argument("--date", dest="date", help="the night's date YYYY-MM-DD [date]")
    ni.add_argument("--out", dest="out", help="output folder [out]")

    tr = sub.add_parser("train", help="adversarially train a built-in architecture from scratch (FGSM-RS)")
    tr.add_argument("--config", help="YAML with 'data' and 'recipe' (flags override it)")
    tr.add_argument("--data", dest="data.name", help="dataset [data.name]")
    tr.add_argument("--data-root", dest="data.root", help="dataset folder [data.root]")
    tr.add_argument("--arch", dest="recipe.arch", help="mlp or small_cnn [recipe.arch]")
    tr.add_argument("--epochs", dest="recipe.epochs", type=int, help="epochs [recipe.epochs]")
    tr.add_argument("--train-samples", dest="recipe.train_samples", type=int, help="first N training images")
    tr.add_argument("--eps", dest="recipe.eps", type=float, help="FGSM-RS eps [recipe.eps]")
    tr.add_argument("--lr", dest="recipe.lr", type=float, help="Adam learning rate [recipe.lr]")
    tr.add_argument("--seed", dest="recipe.seed", type=int, help="seed [recipe.seed]")
    tr.add_argument("--out", required=True, help="checkpoint to write (*.pt)")

    demo = sub.add_parser("demo", help="the embedded default: train old/new on Fashion-MNIST, compare, report")
    demo.add_argument("--config", help="YAML overriding the demo defaults")
    demo.add_argument("--out", default="demo-out", help="folder for the store, models and report")
    demo.add_argument("--test-samples", type=int, dest="test_samples", help="test images to evaluate [test_samples]")
    demo.add_argument("--address", help="Ray address [compute.address]")
    return parser


def _prepare_local_ray_env(address: str | None) -> None:
    """Local Ray binds to loopback on these machines only when told before ``import ray`` (RAY_NOTES §0)."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray Train's teardown after each fit takes 5 s at the default health-check interval, 1-2 s at this
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def cmd_evaluate(args: argparse.Namespace) -> int:
    raw = _settings_dict(args)
    if args.model:
        raw["models"] = [parse_model_spec(s) for s in args.model]
    cfg = parse_config(EvaluateConfig, raw)
    _prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.workflows import run_evaluate

    outcomes, _ = run_evaluate(cfg)
    for o in outcomes:
        print(o.describe())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    raw = _settings_dict(args)
    for side in ("old", "new"):
        if getattr(args, side):
            raw[side] = parse_model_spec(getattr(args, side))
    if getattr(args, "bootstrap.n_resamples") is not None:
        _set_dotted(raw, "bootstrap.n_resamples", getattr(args, "bootstrap.n_resamples"))
    if args.report:
        raw["report"] = args.report
    cfg = parse_config(CompareConfig, raw)
    _prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.core.flips import format_summary
    from rcat_ray.workflows import run_compare

    outcomes, comparison, prepared = run_compare(cfg)
    for o in outcomes:
        print(o.describe())
    if comparison is None:
        print("comparison not computed: an evaluation is incomplete (run again to continue)")
        return 0
    print(format_summary(comparison.summary))
    print(f"comparison {comparison.key} stored in {prepared.store.path(comparison.folder)}")
    if cfg.report:
        from rcat_ray.report import write_report

        print(f"report: {write_report(prepared.store, comparison.key, cfg.report)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rcat_ray.report import write_report
    from rcat_ray.store import ResultStore

    store = ResultStore(args.store)
    key = Path(args.comparison.rstrip("/")).name
    if not store.exists(f"comparisons/{key}/summary.json"):
        raise ConfigError(f"no comparison '{key}' in store {args.store}")
    print(f"report: {write_report(store, key, args.out, top_k=args.top_k)}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    raw = load_yaml(args.config) if args.config else {}
    over: dict[str, Any] = {}
    for _flag, (key, typ, _h) in _FINETUNE_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            _set_dotted(over, key, parse_model_spec(value) if typ == "spec" else value)
    cfg = parse_config(FinetuneConfig, deep_merge(raw, over))
    _prepare_local_ray_env(cfg.address)
    from rcat_ray.distributed.cluster import ensure_ray
    from rcat_ray.distributed.train import run_finetune

    if cfg.num_workers > 0:
        ensure_ray(ComputeConfig(address=cfg.address))
    outcome = run_finetune(cfg)
    last = outcome.history[-1] if outcome.history else {}
    shown = {k: round(v, 4) for k, v in last.items() if k.startswith(("val_", "train_loss"))}
    print(f"fine-tuned model: {outcome.checkpoint} (fingerprint {outcome.fingerprint})")
    print(f"last epoch: {shown}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    raw = _settings_dict(args)
    if args.out:
        raw["out"] = args.out
    cfg = parse_config(TableConfig, raw)
    _prepare_local_ray_env(cfg.compute.address)
    from rcat_ray.paper_table import to_markdown
    from rcat_ray.workflows import run_table

    tables = run_table(cfg)
    print(to_markdown(tables))
    print(f"written: {cfg.out}/table.md, table.tex, table.csv")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    raw = load_yaml(args.config)
    for key in ("mode", "num_samples", "out", "address"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    cfg = parse_config(SweepConfig, raw)
    _prepare_local_ray_env(cfg.address)
    from rcat_ray.distributed.cluster import ensure_ray
    from rcat_ray.distributed.sweep import SweepInterruptedError, run_sweep

    # a TorchTrainer per trial (pattern B) needs the dashboard's state API when ASHA stops a trial
    ensure_ray(ComputeConfig(address=cfg.address), dashboard=cfg.base.num_workers > 1)
    try:
        outcome = run_sweep(cfg, resume=args.resume)
    except SweepInterruptedError as err:
        print(f"rcat-ray sweep: {err}", file=sys.stderr)
        return 3
    c = outcome.chosen
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

    from rcat_ray.errors import USER_ERRORS
    from rcat_ray.nightly import EXIT_COULD_NOT_RUN, NightlyError, run_nightly

    try:
        raw = _settings_dict(args)
        for side in ("baseline", "candidate"):
            if getattr(args, side):
                raw[side] = parse_model_spec(getattr(args, side))
        for key in ("candidate_dir", "history", "date", "out"):
            if getattr(args, key) is not None:
                raw[key] = getattr(args, key)
        cfg = parse_config(NightlyConfig, raw)
        _prepare_local_ray_env(cfg.compute.address)
        outcome = run_nightly(cfg)
    except (*USER_ERRORS, NightlyError) as err:
        print(f"rcat-ray nightly: could not run: {err}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    except Exception:  # noqa: BLE001 - any crash means "could not run" (2), never "gate failed" (1)
        traceback.print_exc()
        print("rcat-ray nightly: could not run (unexpected error above)", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    print(f"verdict: {outcome.verdict_path}; report: {outcome.report}")
    return outcome.exit_code


def cmd_train(args: argparse.Namespace) -> int:
    from rcat_ray.config import DataConfig
    from rcat_ray.pretrain import TrainRecipe, train_checkpoint

    raw = load_yaml(args.config) if args.config else {}
    for key in ("data.name", "data.root", "recipe.arch", "recipe.epochs", "recipe.train_samples", "recipe.eps",
                "recipe.lr", "recipe.seed"):  # fmt: skip
        if getattr(args, key) is not None:
            _set_dotted(raw, key, getattr(args, key))
    data = parse_config(DataConfig, raw.get("data", {}))
    recipe = parse_config(TrainRecipe, raw.get("recipe", {}))
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} exists; choose another --out (checkpoints are never overwritten)")
    train_checkpoint(recipe, data, out, out.stem)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _prepare_local_ray_env(args.address)
    from rcat_ray.demo import DemoConfig, run_demo

    raw = load_yaml(args.config) if args.config else {}
    if args.test_samples:
        raw["test_samples"] = args.test_samples
    if args.address:
        _set_dotted(raw, "compute.address", args.address)
    raw.setdefault("out", args.out)
    run_demo(parse_config(DemoConfig, raw))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from rcat_ray.errors import USER_ERRORS

    handlers = {
        "evaluate": cmd_evaluate, "compare": cmd_compare, "report": cmd_report,
        "train": cmd_train, "finetune": cmd_finetune, "table": cmd_table, "sweep": cmd_sweep, "nightly": cmd_nightly,
        "demo": cmd_demo,
    }  # fmt: skip
    try:
        return handlers[args.command](args)
    except USER_ERRORS as err:
        print(f"rcat-ray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
