"""The ``rcat-ray`` argument parser: per command, ``--config``, every config key as a flag and the short aliases."""

from __future__ import annotations

import argparse
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from rcat_ray.cli.flags import Alias, Flag, add_config_flags, config_dict, config_flags
from rcat_ray.config import DataConfig, parse_config
from rcat_ray.evaluate.config import CompareConfig, EvaluateConfig, TableConfig
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.study.config import StudyConfig
from rcat_ray.sweep.config import SweepConfig

__all__ = ["build_parser", "command_config"]


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
    Alias("--seeds", "attack.seeds"),
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


def command_config(args: argparse.Namespace, cls: type[BaseModel], raw: dict[str, Any] | None = None) -> Any:
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

    stu = sub.add_parser("study", help="the paper's experiment: pairs x methods x seeds, chosen on validation, tested")
    study_aliases = (Alias("--out", "out"), Alias("--seeds", "seeds"), Alias("--store", "store"), *_COMPUTE_ALIASES)
    _add_config(stu, config_flags(StudyConfig), study_aliases, config_help="YAML study config (required)")
    _add_output_flags(stu, json_flag=True)

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


def _version() -> str:
    try:
        return metadata.version("rcat_ray")
    except metadata.PackageNotFoundError:
        return "unknown"
