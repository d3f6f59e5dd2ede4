"""What a newcomer types works: the ```bash block of README.md's "## Commands" section, run line by line.

Every ``rcat-ray`` line of that block is executed in order, as a subprocess of the installed console script,
in a fresh folder holding a copy of the repository's ``jobs/`` (so every relative path of the block, such as
``models/``, ``results/``, ``finetuned/`` and ``jobs/configs/...``, resolves there exactly as it does for a user
in the repository root). Output goes to files, not a terminal. The only substitutions made are the two the
README allows for: ``<key>`` becomes an 8-character prefix of the stored comparison's key (as
``rcat-ray store ls --json`` lists it), and the final ``rcat-ray demo`` line gets
``--config jobs/configs/demo_smoke.yaml`` appended (a reduced demo, so the test takes minutes, not ten).
After each command, the files it promises are checked. A second test checks that the block has an example
of every subcommand the CLI offers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
DEMO_SMOKE = "jobs/configs/demo_smoke.yaml"
#: per-command wall-clock limit, and the session's: what is left is reported before pytest-timeout's 600 s
COMMAND_TIMEOUT_S = 400
SESSION_BUDGET_S = 560


# -- the README block ----------------------------------------------------------------------------------------
def readme_block() -> str:
    """The ```bash block of the "## Commands" section."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Commands\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Commands' section"
    block = re.search(r"^```bash\n(.*?)^```", match.group(1), re.S | re.M)
    assert block, "the '## Commands' section of README.md has no ```bash block"
    return block.group(1)


def readme_commands() -> list[str]:
    """The block's command lines: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", readme_block())
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(line.split(" #", 1)[0].strip() if "#" in line else line.strip())
    return commands


def subcommand(command: str) -> str:
    words = shlex.split(command, comments=True)
    return words[1] if len(words) > 1 else ""


def cli_subcommands() -> set[str]:
    import argparse

    from rcat_ray.cli import build_parser

    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_readme_block_has_an_example_of_every_subcommand():
    commands = readme_commands()
    assert commands, "the README's Commands block is empty"
    not_cli = [c for c in commands if shlex.split(c)[0] != "rcat-ray"]
    assert not not_cli, f"the Commands block runs only rcat-ray (make test runs it): {not_cli}"
    in_readme = {subcommand(c) for c in commands}
    missing = sorted(cli_subcommands() - in_readme)
    assert not missing, f"rcat-ray subcommands without an example in README.md's Commands block: {missing}"
    unknown = sorted(in_readme - cli_subcommands())
    assert not unknown, f"README.md's Commands block uses subcommands the CLI does not have: {unknown}"


# -- running one command -------------------------------------------------------------------------------------
@dataclass
class Ran:
    """One executed line: what ran, how it ended, where its output is."""

    index: int
    readme_line: str
    command: str
    rc: int
    seconds: float
    stdout: Path
    stderr: Path
    problems: list[str] = field(default_factory=list)

    def out(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.is_file() else ""

    def err(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.is_file() else ""

    def describe(self, tail: int = 3000) -> str:
        out, err = self.out(), self.err()
        return (
            f"[{self.index}] $ {self.command}\n    exit code {self.rc} after {self.seconds:.1f} s\n"
            + "".join(f"    - {p}\n" for p in self.problems)
            + f"    --- stdout (last {tail} chars of {self.stdout}) ---\n{out[-tail:]}\n"
            + f"    --- stderr (last {tail} chars of {self.stderr}) ---\n{err[-tail:]}\n"
        )


def session_env() -> dict[str, str]:
    """The user's environment with the venv first on PATH and the settings of the CLI tests (tests/conftest.py)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # start a local Ray as a user's first run does, never join the tests' Ray
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_line(
    command: str, cwd: Path, logs: Path, index: int, readme_line: str, timeout: float = COMMAND_TIMEOUT_S
) -> Ran:
    """Run one line with bash (so ``> file`` means what it means to the user), output piped to files."""
    if not (VENV_BIN / "rcat-ray").exists():  # no console script: the module is the same entry point
        command = re.sub(r"^rcat-ray\b", shlex.quote(sys.executable) + " -m rcat_ray.cli", command)
    stdout, stderr = logs / f"{index:02d}.stdout", logs / f"{index:02d}.stderr"
    t0 = time.perf_counter()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=session_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of this command only (its Ray included)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = -1
    ran = Ran(index, readme_line, command, rc, time.perf_counter() - t0, stdout, stderr)
    if rc == -1:
        ran.problems.append(f"did not finish within {timeout:.0f} s (killed)")
    return ran


# -- the key substitution ------------------------------------------------------------------------------------
def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _strings(v)


def comparison_key_prefix(cwd: Path, logs: Path) -> tuple[str | None, Ran]:
    """An 8-character prefix of the stored comparison's key, as ``rcat-ray store ls --json`` lists it.

    Whatever the JSON's layout, a listed key is a string that names a folder of the store (``results/``, the
    store of the README's commands); the comparison is the one listed key that names a folder under
    ``comparisons/``. The prefix is lengthened in the (unlikely) case that 8 characters are ambiguous.
    """
    ran = run_line("rcat-ray store ls --json", cwd, logs, 99, "(substitution of <key>)")
    if ran.rc != 0:
        ran.problems.append("'rcat-ray store ls --json' failed, so <key> cannot be substituted")
        return None, ran
    try:
        listing = json.loads(ran.out())
    except json.JSONDecodeError as err:
        ran.problems.append(f"'rcat-ray store ls --json' did not print JSON: {err}")
        return None, ran
    store = cwd / "results"
    comparisons = {p.name for p in (store / "comparisons").glob("*") if p.is_dir()}
    every_key = comparisons | {p.name for p in (store / "tables").glob("*") if p.is_dir()}
    listed = {s.rstrip("/").rsplit("/", 1)[-1] for s in _strings(listing)}
    found = sorted(listed & comparisons)
    if len(found) != 1:
        ran.problems.append(
            f"expected the listing to name exactly one stored comparison {sorted(comparisons)}, found {found}"
        )
        return None, ran
    missing = sorted(every_key - listed)
    if missing:
        ran.problems.append(f"'store ls --json' does not list these stored keys: {missing}")
    key = found[0]
    n = 8
    while sum(k.startswith(key[:n]) for k in every_key) > 1:
        n += 1
    return key[:n], ran


# -- what each command promises ------------------------------------------------------------------------------
def _flag(command: str, name: str) -> str | None:
    words = shlex.split(command, comments=True)
    return words[words.index(name) + 1] if name in words else None


def _config_out(cwd: Path, command: str, *, section: str | None = None) -> Path:
    """The output folder a command writes: its --out flag, else its config's ``out``."""
    out = _flag(command, "--out")
    if out is None:
        config = yaml.safe_load((cwd / str(_flag(command, "--config"))).read_text())
        out = (config[section] if section else config)["out"]
    return cwd / out


def _files(folder: Path, *names: str) -> list[str]:
    return [f"missing {folder / n}" for n in names if not (folder / n).is_file() or (folder / n).stat().st_size == 0]


def _find_metric(node: Any, names: set[str]) -> bool:
    """A metric named one of ``names`` with a number (or a {value: number}) somewhere in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if str(k) in names and (
                isinstance(v, int | float) or (isinstance(v, dict) and isinstance(v.get("value"), int | float))
            ):
                return True
            if _find_metric(v, names):
                return True
    elif isinstance(node, list):
        return any(_find_metric(v, names) for v in node)
    return False


def check_outputs(ran: Ran, cwd: Path, state: dict[str, Any]) -> list[str]:
    """What a finished command promises, by subcommand. Returns the problems found (empty: all there)."""
    cmd, sub = ran.command, subcommand(ran.command)
    store = cwd / "results"
    problems: list[str] = []
    if sub == "train":
        problems += _files(cwd, str(_flag(cmd, "--out")))
    elif sub == "evaluate":
        tables = sorted(store.glob("tables/*/table.parquet"))
        if len(tables) < 2:
            problems.append(f"expected the store to hold both models' tables, found {len(tables)}")
        if "chunks computed" not in ran.out():
            problems.append("evaluate printed no 'chunks computed' line per model")
    elif sub == "compare":
        if "--report" in cmd:
            problems += _files(cwd / str(_flag(cmd, "--report")), "report.html")
        if not sorted(store.glob("comparisons/*/summary.json")):
            problems.append("no comparison summary in the store")
        computed = re.findall(r"(\d+) chunks computed", ran.out() + ran.err())
        if not computed:
            problems.append("compare printed no 'N chunks computed' line per model")
        if "Started a local Ray instance" in ran.err():
            problems.append("compare started Ray although both tables were stored (README: no Ray needed)")
        if any(int(n) for n in computed):
            problems.append(
                f"compare recomputed chunks ({computed}): digits_quick.yaml's evaluation settings do "
                "not match the README's evaluate line, so its tables were not reused"
            )
        if "--json" in cmd:
            target = cwd / cmd.rsplit(">", 1)[1].strip() if ">" in cmd else None
            text = target.read_text() if target and target.is_file() else ran.out()
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as err:
                problems.append(f"compare --json did not write JSON ({err}): {text[:300]!r}")
            else:
                for names in ({"nfr", "NFR"}, {"r_nfr", "R-NFR"}):
                    if not _find_metric(doc, names):
                        problems.append(f"compare --json has no {sorted(names)} metric")
    elif sub == "store":
        action = shlex.split(cmd)[2] if len(shlex.split(cmd)) > 2 else ""
        if action == "ls":
            stored = sorted(p.name for p in (*store.glob("tables/*"), *store.glob("comparisons/*")) if p.is_dir())
            unlisted = [k for k in stored if k[:8] not in ran.out()]
            if unlisted:
                problems.append(f"store ls does not print these stored keys: {unlisted}")
        if action == "show" and state.get("full_key") and state["full_key"] not in ran.out():
            problems.append(f"store show does not print the full key {state['full_key']}")
    elif sub == "report":
        problems += _files(_config_out(cwd, cmd), "report.html")
    elif sub == "finetune":
        output = cwd / str(_flag(cmd, "--output"))
        problems += _files(output.parent, output.name, output.with_suffix(".json").name)
    elif sub == "table":
        out = _config_out(cwd, cmd)
        problems += _files(out, "table.md", "table.tex", "table.csv")
        if (out / "table.md").is_file() and "RCAT" not in (out / "table.md").read_text():
            problems.append("table.md has no RCAT row")
    elif sub == "sweep":
        out = _config_out(cwd, cmd)
        problems += _files(out, "trials.parquet", "best.yaml", "pareto.png", "report.html", "table/table.md")
    elif sub == "study":
        out = _config_out(cwd, cmd)
        problems += _files(out, "study.md", "study.tex", "study.csv", "study.json", "report.html", "manifest.json")
        if (out / "study.md").is_file() and "RCAT" not in (out / "study.md").read_text():
            problems.append("study.md has no RCAT row")
    elif sub == "nightly":
        out = _config_out(cwd, cmd)
        verdicts = sorted(out.glob("*/verdict.json"))
        if not verdicts:
            problems.append(f"no <run id>/verdict.json under {out}")
        for path in (*verdicts, out / "latest-verdict.json"):
            try:
                verdict = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                problems.append(f"{path} is not a readable verdict: {err}")
                continue
            if verdict.get("passed") is not (ran.rc == 0):
                problems.append(f"exit code {ran.rc} but {path} says passed={verdict.get('passed')}")
    elif sub == "demo":
        out = cwd / str(_flag(cmd, "--out"))
        problems += _files(out, "table/table.md", "report/new/report.html")
        if not sorted(out.glob("report/RCAT*/report.html")):
            problems.append(f"no {out}/report/RCAT*/report.html")
    return problems


def ok_exit(command: str, rc: int) -> bool:
    """Every command exits 0; the nightly gate may also exit 1 (a gate failed, with its verdict written)."""
    return rc == 0 or (subcommand(command) == "nightly" and rc == 1)


# -- the session -----------------------------------------------------------------------------------------------
def written_elsewhere(cwd: Path, t0: float) -> list[str]:
    """Files this session wrote in its folder that were also written, since ``t0``, where a relative path would
    land if it were resolved against something else: the repository root, or Ray's session folders (the working
    directories of Ray Train workers and Tune trials). Matching on the session's own relative file paths (say
    ``finetuned/digits-rcat.pt``) keeps other people's runs on the same machine out of it."""
    made = {
        p.relative_to(cwd).as_posix()
        for p in cwd.rglob("*")
        if p.is_file() and p.relative_to(cwd).parts[0] not in ("jobs", "ray_results")
    }
    found = [str(ROOT / rel) for rel in sorted(made) if (ROOT / rel).is_file() and (ROOT / rel).stat().st_mtime >= t0]
    for artifacts in Path("/tmp/ray").glob("session_*/artifacts"):
        if artifacts.stat().st_mtime < t0:
            continue
        for dirpath, _dirs, files in os.walk(artifacts):
            for name in files:
                path = Path(dirpath, name)
                tails = {"/".join(path.parts[-k:]) for k in range(1, len(path.parts))}
                if tails & made and path.stat().st_mtime >= t0:
                    found.append(str(path))
    return found


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("readme-session")
    logs = tmp_path_factory.mktemp("readme-logs")
    shutil.copytree(ROOT / "jobs", cwd / "jobs")
    commands = readme_commands()
    assert subcommand(commands[-1]) == "demo", "the README's Commands block should end with the demo"

    t_start = time.time()
    state: dict[str, Any] = {}
    runs: list[Ran] = []
    for i, line in enumerate(commands):
        command = line
        left = SESSION_BUDGET_S - (time.time() - t_start)
        if left < 10:
            late = Ran(i, line, command, -2, 0.0, logs / "none", logs / "none")
            late.problems.append(f"not run: the session's {SESSION_BUDGET_S} s were spent")
            runs.append(late)
            continue
        if "<key>" in command:
            if "key" not in state:
                state["key"], lookup = comparison_key_prefix(cwd, logs)
                runs.append(lookup)
                if state["key"]:
                    state["full_key"] = next(
                        p.name for p in (cwd / "results/comparisons").iterdir() if p.name.startswith(state["key"])
                    )
            if not state["key"]:
                skipped = Ran(i, line, command, -2, 0.0, logs / "none", logs / "none")
                skipped.problems.append("not run: no key to substitute for <key> (see the store ls --json entry)")
                runs.append(skipped)
                continue
            command = command.replace("<key>", state["key"])
        if i == len(commands) - 1:
            command = f"{command} --config {DEMO_SMOKE}"
        ran = run_line(command, cwd, logs, i, line, timeout=min(COMMAND_TIMEOUT_S, left))
        if not ok_exit(command, ran.rc):
            ran.problems.append(f"exit code {ran.rc}")
        ran.problems += check_outputs(ran, cwd, state)
        runs.append(ran)
    total = time.time() - t_start

    # relative paths resolved where the user ran the commands, nowhere else
    stray = written_elsewhere(cwd, t_start)

    timing = "\n".join(f"{r.seconds:7.1f} s  rc={r.rc:<3} {r.command}" for r in runs)
    report = f"README Commands session in {cwd} (logs in {logs}), {total:.0f} s:\n{timing}\n"
    (logs / "timing.txt").write_text(report)
    print(report)

    failed = [r for r in runs if r.problems]
    message = ""
    if failed:
        message += f"{len(failed)} of {len(runs)} README commands failed (first failure first):\n\n"
        message += "\n".join(r.describe() for r in failed)
    if stray:
        message += f"\nfiles written outside the session's folder (a relative path resolved elsewhere): {stray}\n"
    assert not message, message + "\n" + report
