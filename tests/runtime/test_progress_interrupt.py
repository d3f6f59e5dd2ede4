"""The CLI's evaluation seen from outside, in a subprocess whose stdout and stderr are pipes (cron, CI,
``nohup``, ``| tee``): progress lines while it works, Ctrl+C and SIGTERM that keep every finished chunk and
say so in one line, and a stderr free of Ray's and the model libraries' own noise unless ``--verbose``.

Each end-to-end test starts its own local Ray in the subprocess (the shared session of the other tests is
not used), so they are slow: about 20-40 s per run on two cores. The signal helpers are tested in-process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rcat_ray.runtime.interrupts import (
    EvaluationInterrupted,
    Terminated,
    interrupt_signal_name,
    reclaim_sigterm,
    sigterm_as_interrupt,
)

N_CHUNKS = 10  # --limit 200 in chunks of 20: the run is still busy when its first chunk lands

#: What must not reach a user who did not ask for --verbose (where each comes from: rcat_ray/runtime/quiet/).
NOISE = (
    "Token authentication is enabled",  # Ray's auth notice, logged by ray.init
    "Generated new authentication token",
    "has constructor arguments in the object store",  # the driver's C++ core worker, on every actor pool
    "Started a local Ray instance",
    "Starting execution of Dataset",  # Ray Data's execution logs and logged progress bars
    "Execution plan of Dataset",
    "execution finished",
    "Progress will be logged",
    "Progress bars disabled",
    "logging_progress.py",
    "Warning:",  # DeprecationWarning, FutureWarning, UserWarning lines of the warnings module
)

INTERRUPTED = re.compile(r"interrupted: (\d+) of (\d+) chunks stored; run the same command again to continue")
PROGRESS = re.compile(r"^\[evaluate\] (\d+)/(\d+) chunks \(\d+%\)", re.MULTILINE)


def _argv(store: Path, *extra: str, limit: int = 20 * N_CHUNKS) -> list[str]:
    return [
        "evaluate",
        "--data",
        "digits",
        "--eps",
        "0.1",
        "--n-iter",
        "50",
        "--chunk-size",
        "20",
        "--limit",
        str(limit),
        "--model",
        "builtin:mlp",
        "--store",
        str(store),
        *extra,
    ]


@contextlib.contextmanager
def sigint_delivered() -> Iterator[None]:
    """Children started inside receive Ctrl+C as from a terminal. A test run started in the background by a
    non-interactive shell ignores SIGINT, children inherit an ignored signal (a handler is reset at exec, an
    ignore is not), and Python in the child would then never raise KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _command(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", f"from rcat_ray.cli import main; import sys; sys.exit(main({argv!r}))"]


def _env(home: Path | None = None) -> dict[str, str]:
    """A local Ray on loopback. With ``home``, Ray's auth mode is left unset, as for a user who set nothing:
    Ray then enables token auth (its token goes to ``home``/.ray) and logs the notice that quiet must hide."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    if home is None:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        home.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
    return env


def _chunk_manifests(store: Path) -> list[Path]:
    return sorted(store.glob("tables/*/chunks/chunk-*.json"))  # a chunk's manifest is written last: "done"


def _wait_for_first_chunk(proc: subprocess.Popen, store: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not _chunk_manifests(store):
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the evaluation exited ({proc.returncode}) before storing a chunk:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"no chunk stored within {timeout} s:\n{err}")
        time.sleep(0.1)


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, text=True, capture_output=True, timeout=600, check=False)


def _assert_quiet(err: str) -> None:
    shown = [line for line in err.splitlines() if any(n in line for n in NOISE)]
    assert not shown, "noise on stderr:\n" + "\n".join(shown)
    assert "Traceback" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_keeps_finished_chunks_and_the_same_command_continues(tmp_path, signum, status):
    store = tmp_path / "store"
    argv = _argv(store)
    with sigint_delivered():
        proc = subprocess.Popen(
            _command(argv), cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    try:
        _wait_for_first_chunk(proc, store)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    said = INTERRUPTED.fullmatch(last)
    assert said, f"last stderr line: {last!r}\n{err}"
    assert proc.returncode == status, err
    stored = _chunk_manifests(store)
    # the message counts what was stored when the pool was released; an actor may finish the chunk it held
    # until Ray shuts down, never less
    assert 1 <= int(said[1]) <= len(stored) < N_CHUNKS and int(said[2]) == N_CHUNKS
    assert not list(store.rglob("table.parquet")), "a table was assembled from part of the chunks"
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name], "temporary files left in the store"
    if signum == signal.SIGTERM:
        return  # the continuation is the same whichever signal stopped the run: checked once, below

    # The same command again: only the missing chunks are computed, finished ones are not touched, and the
    # run is quiet (here with Ray's default token auth, whose notice must not show) with its progress lines.
    before = {p: p.read_bytes() for p in stored}
    again = _run(_command(argv), tmp_path, _env(home=tmp_path / "home"))
    assert again.returncode == 0, again.stderr
    counts = re.search(r"(\d+) chunks computed, (\d+) reused of (\d+)", again.stdout)
    assert counts, again.stdout
    assert [int(x) for x in counts.groups()] == [N_CHUNKS - len(stored), len(stored), N_CHUNKS]
    assert all(p.read_bytes() == data for p, data in before.items())
    assert len(list(store.rglob("table.parquet"))) == 1
    _assert_quiet(again.stderr)
    lines = PROGRESS.findall(again.stderr)
    assert lines[0] == (str(len(stored)), str(N_CHUNKS)), again.stderr  # where it starts from
    assert lines[-1] == (str(N_CHUNKS), str(N_CHUNKS)), again.stderr


@pytest.mark.slow
def test_verbose_shows_ray_logs_and_still_the_progress_lines(tmp_path):
    """With --verbose the progress lines are there too; Ray's own lines (which the quiet run above proved
    hidden) show, which also proves that the quiet check would catch them."""
    run = _run(_command(_argv(tmp_path / "store", "--verbose", limit=40)), tmp_path, _env(home=tmp_path / "home"))
    assert run.returncode == 0, run.stderr
    assert PROGRESS.findall(run.stderr)[-1] == ("2", "2"), run.stderr
    assert "Token authentication is enabled" in run.stderr
    assert "has constructor arguments in the object store" in run.stderr


_IMPORT_MODEL_LIBRARIES = (
    "import sys; from rcat_ray.runtime.quiet import configure_quiet; "
    "configure_quiet(verbose=sys.argv[1] == 'verbose'); "
    "from rcat_ray.core.models import register_autoattack_alias; register_autoattack_alias(); "
    "import robustbench.utils, timm"
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_model_library_warnings_only_with_verbose(tmp_path, mode):
    """Importing robustbench warns (torch's ``torch.jit.interface`` FutureWarning, its own ``pkg_resources``
    UserWarning): nothing on stderr by default, the warnings with --verbose."""
    run = _run([sys.executable, "-c", _IMPORT_MODEL_LIBRARIES, mode], tmp_path, _env())
    assert run.returncode == 0, run.stderr
    if mode == "quiet":
        assert run.stderr == ""
    else:
        assert "FutureWarning" in run.stderr and "pkg_resources is deprecated" in run.stderr


def _deliver_sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler runs in the main thread at the next bytecode; never reached when it raises


def test_sigterm_raises_terminated_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as caught, sigterm_as_interrupt():
        _deliver_sigterm()
    assert isinstance(caught.value, KeyboardInterrupt) and interrupt_signal_name(caught.value) == "SIGTERM"
    assert interrupt_signal_name(KeyboardInterrupt()) == "SIGINT"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_is_reclaimed_after_ray_init_replaces_the_handler():
    """ray.init installs its own SIGTERM handler (sys.exit); ensure_ray reclaims it, and Ray's comes back
    after the block."""
    before = signal.getsignal(signal.SIGTERM)

    def rays_handler(signum, frame):
        raise SystemExit(signum)

    try:
        with sigterm_as_interrupt():
            signal.signal(signal.SIGTERM, rays_handler)
            reclaim_sigterm()
            with pytest.raises(Terminated):
                _deliver_sigterm()
        assert signal.getsignal(signal.SIGTERM) is rays_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    reclaim_sigterm()  # outside a block: does nothing
    assert signal.getsignal(signal.SIGTERM) is before


def test_evaluation_interrupted_says_what_is_kept_and_the_exit_status():
    err = EvaluationInterrupted(5, 8, "SIGINT")
    assert f"interrupted: {err}" == "interrupted: 5 of 8 chunks stored; run the same command again to continue"
    assert (err.stored, err.total, err.signal_name, err.exit_code) == (5, 8, "SIGINT", 130)
    assert EvaluationInterrupted(1, 2, "SIGTERM").exit_code == 143
    assert isinstance(err, KeyboardInterrupt)  # no `except Exception` on the way up turns it into an error
