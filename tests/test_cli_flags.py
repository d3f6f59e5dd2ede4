"""The CLI's flags are derived from the config models: every key is a flag, with its field's description."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rcat_ray.cli.flags import config_flags
from rcat_ray.cli.parser import build_parser, command_config
from rcat_ray.config import parse_config
from rcat_ray.demo import DemoConfig
from rcat_ray.errors import ConfigError
from rcat_ray.evaluate.config import CompareConfig, EvaluateConfig, TableConfig
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.study.config import StudyConfig
from rcat_ray.sweep.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "evaluate": EvaluateConfig,
    "compare": CompareConfig,
    "table": TableConfig,
    "finetune": FinetuneConfig,
    "sweep": SweepConfig,
    "study": StudyConfig,
    "nightly": NightlyConfig,
    "demo": DemoConfig,
}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_key_is_a_flag_with_its_description(command):
    parser = _subparser(command)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    for key, flag in config_flags(COMMANDS[command]).items():
        action = by_dest.get(key)
        assert action is not None, f"rcat-ray {command}: config key {key} has no flag"
        assert flag.help, f"{COMMANDS[command].__name__}: {key} has no Field description for its --help"
        assert flag.help in action.help, (key, action.help)


def test_flags_override_the_yaml_key_by_key(tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"attack": {"eps": 0.2, "n_iter": 9}, "data": {"name": "digits", "limit": 50}, "chunk_size": 25})
    )
    args = build_parser().parse_args(
        [
            "evaluate",
            "--config",
            str(cfg_file),
            "--eps",
            "0.1",
            "--attack.n_restarts",
            "3",
            "--attacks",
            "apgd-ce,apgd-dlr",
            "--model",
            "builtin:mlp",
            "--model",
            "checkpoint:x.pt",
            "--no-save_adversarial",
            "--compute.chunks_in_flight",
            "4",
        ]
    )
    cfg = command_config(args, EvaluateConfig)
    assert cfg.attack.eps == 0.1 and cfg.attack.n_iter == 9 and cfg.attack.n_restarts == 3  # flag > YAML > default
    assert cfg.attack.attacks == ("apgd-ce", "apgd-dlr")
    assert (cfg.data.name, cfg.data.limit, cfg.chunk_size) == ("digits", 50, 25)
    assert [m.source for m in cfg.models] == ["builtin", "checkpoint"]
    assert cfg.save_adversarial is False and cfg.compute.chunks_in_flight == 4
    assert cfg.attack.seeds is None
    seeded = build_parser().parse_args(["evaluate", "--eps", "0.1", "--seeds", "0,1", "--model", "builtin:mlp"])
    assert command_config(seeded, EvaluateConfig).attack.seeds == (0, 1)


def test_a_missing_key_is_named_by_the_flag_the_user_would_type():
    args = build_parser().parse_args(["evaluate", "--model", "builtin:mlp"])
    with pytest.raises(ConfigError, match="--eps is required"):
        command_config(args, EvaluateConfig)
    args = build_parser().parse_args(["evaluate", "--model", "builtin:mlp", "--eps", "0.1", "--attack.n_iter", "0"])
    with pytest.raises(ConfigError, match=r"--n-iter \(attack.n_iter\): Input should be greater than or equal to 1"):
        command_config(args, EvaluateConfig)


def test_the_printed_demo_config_is_the_demo_and_its_methods_are_the_protocols_choice():
    """The demo's defaults live in DemoConfig alone; ``--print-config`` writes them, and they are what
    bench/fidelity.py chose on validation (bench/results/fidelity-chosen.yaml)."""
    text = subprocess.run(
        [sys.executable, "-m", "rcat_ray.cli", "demo", "--print-config"], capture_output=True, text=True, check=True
    ).stdout
    printed = parse_config(DemoConfig, yaml.safe_load(text))
    assert printed == DemoConfig()
    chosen = yaml.safe_load((ROOT / "bench" / "results" / "fidelity-chosen.yaml").read_text())
    assert parse_config(DemoConfig, {"methods": chosen["methods"]}).methods == DemoConfig().methods
