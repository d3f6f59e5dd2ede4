"""A run that fails after its inputs were accepted, and what a run prints into a pipe or a log file.

* A chunk that cannot be written on a worker (a full disk, a path blocked by a folder) stops ``rcat-ray
  evaluate`` with exit status 4 and one line naming the cause, not Ray's traceback: the finished chunks stay, the
  failed one leaves nothing behind, and the ``--log-file`` keeps the whole traceback.
* Nothing written to a pipe or to the ``--log-file`` carries terminal colour codes, although Ray colours the
  prefix of every line it forwards from a worker whatever its output is.
* A successful fine-tune shows no line of Ray Train's controller or placement-group cleaner and no traceback of
  Ray's; the log file keeps what was held back, and ``--verbose`` shows it.

The end-to-end tests run the real ``rcat-ray`` console script in a subprocess whose stdout and stderr are pipes
(each starts its own local Ray: about 1-2 minutes each on two loaded cores). The rest runs in-process or in a
short subprocess without a Ray cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rcat_ray.cli import EXIT_INCOMPLETE, EXIT_RUN_FAILED, main
from rcat_ray.runtime.failures import describe_failure
from rcat_ray.runtime.hooks import CHUNK_GATE_ENV
from rcat_ray.runtime.quiet import PlainFormatter, strip_ansi

ESC = "\x1b"
RCAT_RAY = str(Path(sys.executable).parent / "rcat-ray")


def _env(**extra: str) -> dict[str, str]:
    """A local Ray on loopback, in a process whose output goes to pipes (as in cron, CI or ``| tee``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", **extra)
    return env


# -- one line with the cause --------------------------------------------------------------------------------------


def test_colour_codes_are_stripped_and_the_log_formatter_writes_none():
    coloured = "\x1b[36m(RayTrainWorker pid=7)\x1b[0m epoch 1\x1b[32m [repeated 3x across cluster]\x1b[0m \x1b[1mx"
    assert strip_ansi(coloured) == "(RayTrainWorker pid=7) epoch 1 [repeated 3x across cluster] x"
    import logging

    record = logging.LogRecord("ray", logging.WARNING, __file__, 1, "see %s", ("\x1b[32mhttp://h:8265\x1b[39m",), None)
    assert PlainFormatter("%(message)s").format(record) == "see http://h:8265"


def test_a_worker_failure_is_described_by_its_cause_not_by_rays_wrapper():
    """Ray Data raises ``UserCodeException(...) from err`` in the worker; the driver gets
    ``RayTaskError(UserCodeException)`` whose text (with colour codes) is all that is left of the OSError."""
    from ray.exceptions import ActorDiedError, RayTaskError, UserCodeException

    worker_traceback = (
        "Traceback (most recent call last):\n"
        '  File "/x/rcat_ray/store.py", line 195, in _write_atomic\n'
        "    out.write(data)\n"
        "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/x/ray/data/_internal/planner/plan_udf_map_op.py", line 482, in _try_wrap_udf_exception\n'
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    wrapped = RayTaskError(
        "submit",
        worker_traceback,
        UserCodeException("UDF failed to process a data block."),
        proctitle="ray::MapWorker(MapBatches(ChunkEvaluator)).submit()",
        pid=5,
        ip="127.0.0.1",
    ).as_instanceof_cause()
    assert ESC in str(wrapped)  # what the old message printed, 39 lines of it
    assert describe_failure(wrapped) == (
        "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
    )
    # where Ray kept the original exception as an object, that object is the cause
    direct = RayTaskError("f", "Traceback ...", OSError(28, "No space left on device")).as_instanceof_cause()
    assert describe_failure(direct) == "OSError: [Errno 28] No space left on device"
    try:
        try:
            raise OSError(28, "No space left on device", "/store/chunk-000003.parquet")
        except OSError as err:
            raise RuntimeError("while writing chunk 3") from err
    except RuntimeError as chained:
        assert describe_failure(chained) == "OSError: [Errno 28] No space left on device: '/store/chunk-000003.parquet'"
    # a failure of Ray itself: the first line of its own message
    died = "ActorDiedError: The actor died unexpectedly before finishing this task."
    assert describe_failure(ActorDiedError()) == died


def test_run_failures_and_input_errors_are_told_apart():
    from ray.exceptions import RayTaskError

    from rcat_ray.errors import ConfigError, DataError, EvaluationRunError, SweepFailedError
    from rcat_ray.runtime.failures import is_run_failure

    assert is_run_failure(EvaluationRunError("the evaluation stopped: ..."))
    assert is_run_failure(SweepFailedError("all 2 trials failed"))
    assert is_run_failure(OSError(28, "No space left on device"))
    assert is_run_failure(RayTaskError("f", "tb", ValueError("x")).as_instanceof_cause())
    assert not is_run_failure(ConfigError("attack.eps: required"))
    assert not is_run_failure(RayTaskError("f", "tb", DataError("no such file")).as_instanceof_cause())
    assert not is_run_failure(ValueError("a bug"))  # a bug keeps its traceback
    assert len({0, 1, 2, EXIT_INCOMPLETE, EXIT_RUN_FAILED, 130, 143}) == 7


def test_ray_that_cannot_start_is_a_run_failure_in_one_line(monkeypatch):
    """On a loaded machine a local Ray can time out at startup (Ray raises a bare ``Exception``: seen by the
    rehearsal bench, where ``compare`` then printed 30 lines of traceback and exited 1): it is a run failure."""
    import ray

    from rcat_ray.config import ComputeConfig
    from rcat_ray.errors import RayStartError
    from rcat_ray.runtime.cluster import ensure_ray
    from rcat_ray.runtime.failures import is_run_failure

    def timed_out(*a, **k):
        raise Exception(
            "The current node timed out during startup. This could happen because some of the raylet "
            "failed to startup or the GCS has become overloaded."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    with pytest.raises(RayStartError) as err:
        ensure_ray(ComputeConfig())
    assert is_run_failure(err.value)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("could not start or join a local Ray instance: ")
    assert "timed out during startup" in str(err.value)


_EVALUATE = ["evaluate", "--data", "digits", "--eps", "0.1", "--model", "builtin:mlp"]


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            OSError(28, "No space left on device", "/s/tables/k/chunks/chunk-000003.parquet"),
            "run failed: OSError: [Errno 28] No space left on device: '/s/tables/k/chunks/chunk-000003.parquet'",
        ),
        (
            "EvaluationRunError",
            "run failed: the evaluation stopped: OSError: [Errno 28] No space left on device; "
            "finished chunks are stored; run again to compute the rest",
        ),
    ],
    ids=["OSError", "EvaluationRunError"],
)
def test_the_cli_says_a_run_failure_in_one_line_and_exits_4(tmp_path, monkeypatch, capsys, error, said):
    from rcat_ray.errors import EvaluationRunError
    from rcat_ray.evaluate import run as workflows

    if error == "EvaluationRunError":  # a message that spans lines, as older errors did, still comes out whole
        error = EvaluationRunError(
            "the evaluation stopped: OSError: [Errno 28] No space left on device\n"
            "finished chunks are stored; run again to compute the rest"
        )

    def failing(cfg, *a, **k):
        raise error

    monkeypatch.setattr(workflows, "run_evaluate", failing)
    assert main([*_EVALUATE, "--store", str(tmp_path / "store")]) == EXIT_RUN_FAILED
    err = capsys.readouterr().err
    assert err == f"rcat-ray evaluate: {said}\n"

    def bug(cfg, *a, **k):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(workflows, "run_evaluate", bug)
    with pytest.raises(ZeroDivisionError):  # not a run failure: the traceback is what helps
        main([*_EVALUATE, "--store", str(tmp_path / "store")])


_FAILING_EVALUATE = r"""
import sys
from rcat_ray.evaluate import run as workflows

def failing(cfg, *args, **kwargs):  # the store's disk filled up during the run
    raise OSError(28, "No space left on device", "/s/tables/k/chunks/chunk-000003.parquet")

workflows.run_evaluate = failing
from rcat_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("flags", [[], ["--log-file", "run.log"], ["--verbose"]], ids=["plain", "log-file", "verbose"])
def test_a_run_failure_is_one_line_on_the_real_stderr_its_traceback_in_the_log_or_with_verbose(tmp_path, flags):
    """In a process of its own (pytest's capture would hide where a record without a handler ends up)."""
    argv = [*_EVALUATE, "--store", str(tmp_path / "store"), *flags]
    run = subprocess.run(
        [sys.executable, "-c", _FAILING_EVALUATE, *argv],
        cwd=tmp_path,
        env=_env(),
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == EXIT_RUN_FAILED, run.stderr
    line = "rcat-ray evaluate: run failed: OSError: [Errno 28] No space left on device: "
    line += "'/s/tables/k/chunks/chunk-000003.parquet'\n"
    if "--verbose" in flags:
        assert run.stderr.endswith(line) and "Traceback (most recent call last)" in run.stderr, run.stderr
    else:
        assert run.stderr == line
    if "--log-file" in flags:
        text = (tmp_path / "run.log").read_text()
        assert "Traceback (most recent call last)" in text and "No space left on device" in text, text


# -- forwarded lines: held back, shown with --verbose, always in the log, never coloured off a terminal -----------

_FORWARD = r"""
import io, logging, sys
from rcat_ray.runtime import quiet
quiet.configure_quiet(verbose=sys.argv[1] == "verbose")
log = io.StringIO()
handler = logging.StreamHandler(log)
handler.setFormatter(quiet.PlainFormatter("%(message)s"))
quiet.add_log_handler(handler)
assert quiet.route_worker_logs()
from ray._private.worker import print_worker_logs  # what Ray's log thread calls for every batch

def batch(actor, pid, *lines):
    return {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": pid, "actor_name": actor, "task_name": None,
            "lines": list(lines), "is_err": True}

print_worker_logs(batch("RayTrainWorker", 7, "[finetune RCAT epoch 1/1] 4/4 batches (100%)",
                        "Reporting training result 1: TrainingReport(checkpoint=...)"), sys.stderr)
print_worker_logs(batch("PlacementGroupCleaner", 9, "Failed to query Ray Train Controller actor state. "
                        "State API may be temporarily unavailable. Continuing to monitor."), sys.stderr)
print_worker_logs(batch("TrainController", 8, "Failed to stop PlacementGroupCleaner gracefully.",
                        "Traceback (most recent call last):", '  File "callback.py", line 127, in _stop_cleaner',
                        "    ray.get(self._cleaner.stop.remote(), timeout=self._stop_timeout)",
                        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready."), sys.stderr)
print_worker_logs(batch("RayTrainWorker", 10, "Traceback (most recent call last):", '  File "w.py", line 2, in f',
                        "ValueError: boom", "[finetune RCAT] epoch 1/1 done"), sys.stderr)
print_worker_logs(batch(None, 11, "Checkpoint successfully created at: Checkpoint(path=/t)"), sys.stderr)
print_worker_logs(batch("RayTrainWorker", 7, "a line \x1b[32m [repeated 3x across cluster]\x1b[0m"), sys.stdout)
sys.stdout.write("LOG:\n" + log.getvalue())
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_forwarded_lines_are_plain_held_back_unless_verbose_and_all_kept_in_the_log(tmp_path, mode):
    run = subprocess.run(
        [sys.executable, "-c", _FORWARD, mode],
        cwd=tmp_path,
        env=_env(),
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out, log = run.stdout.split("LOG:\n")
    assert ESC not in run.stdout + run.stderr  # the prefixes and the dedup note are coloured by Ray
    assert "(RayTrainWorker pid=7) a line  [repeated 3x across cluster]" in out
    shown = run.stderr.splitlines()
    internal = (
        "PlacementGroupCleaner",
        "TrainController",
        "Traceback",
        "GetTimeoutError",
        "ValueError: boom",
        "Reporting training result",
        "Checkpoint successfully created",
    )
    for what in internal:
        assert (what in run.stderr) == (mode == "verbose"), run.stderr
        assert what in log, log  # the log file keeps what the terminal was spared
    assert "(RayTrainWorker pid=7) [finetune RCAT epoch 1/1] 4/4 batches (100%)" in shown
    assert "(RayTrainWorker pid=10) [finetune RCAT] epoch 1/1 done" in shown  # the traceback ended before it
    assert len(log.splitlines()) == 14  # every forwarded line, shown or held back


# -- end to end: a chunk that cannot be written -------------------------------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(path: Path) -> Iterator[None]:
    """A 4 MiB filesystem at ``path`` (root with permission to mount only; skipped elsewhere)."""
    path.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real full disk needs root and mount")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _fill(folder: Path) -> None:
    """Write a file until the filesystem has no free block left (the real ``No space left on device``)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


def _wait(what: str, ready, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no {what} within {timeout} s:\n{out}\n{err}")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full-disk", "blocked-path"])
def test_a_chunk_that_cannot_be_written_stops_the_run_in_one_line_with_exit_4(tmp_path, fault):
    """Every chunk waits at the test gate (``rcat_ray.runtime.hooks.CHUNK_GATE_ENV``: it only holds a chunk back,
    it injects nothing). The first chunk to arrive is let through and stored; the next one is held while the
    store's disk is filled to the last block (a 4 MiB tmpfs), or a folder is put where its files go, then the
    gate opens: the write fails for real. Which chunk Ray Data hands the actor first is not fixed, so the test
    follows the order the chunks arrive in."""
    disk = tmp_path / "disk"
    gate = tmp_path / "gate"
    gate.mkdir()
    log = tmp_path / "evaluate.log"

    def arrived() -> list[int]:
        return sorted(int(p.name.rsplit("-", 1)[1]) for p in gate.glob("arrived-0-*"))

    with _small_tmpfs(disk) if fault == "full-disk" else contextlib.nullcontext():
        disk.mkdir(exist_ok=True)
        store = disk / "store"
        argv = [
            RCAT_RAY,
            "evaluate",
            "--data",
            "digits",
            "--eps",
            "0.1",
            "--attacks",
            "apgd-ce",
            "--n-iter",
            "1",
            "--chunk-size",
            "20",
            "--limit",
            "60",
            "--model",
            "builtin:small_cnn",
            "--workers",
            "1",
            "--store",
            str(store),
            "--log-file",
            str(log),
        ]
        proc = subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=_env(**{CHUNK_GATE_ENV: str(gate)}),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _wait("a chunk at the gate", arrived, proc)
            done = arrived()[0]
            (gate / f"open-0-{done}").touch()
            stored = lambda: list(store.glob(f"tables/*/chunks/chunk-{done:06d}.json"))  # noqa: E731
            _wait(f"chunk {done} stored and another at the gate", lambda: stored() and len(arrived()) > 1, proc)
            held = next(c for c in arrived() if c != done)
            chunks = stored()[0].parent
            kept = {p.name: p.read_bytes() for p in chunks.iterdir()}
            if fault == "full-disk":
                _fill(disk)
                cause = "No space left on device"
            else:
                for name in (f"adv-{held:06d}.npz", f"chunk-{held:06d}.parquet"):
                    (chunks / name / "in-the-way").mkdir(parents=True)
                cause = "Is a directory"
            (gate / "open-all").touch()
            out, err = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == EXIT_RUN_FAILED, err
        assert ESC not in out + err and "Traceback" not in err, err
        said = [line for line in err.splitlines() if "run failed" in line]
        assert len(said) == 1 and err.splitlines()[-1] == said[0], err
        assert said[0].startswith("rcat-ray evaluate: run failed: the evaluation stopped: "), err
        assert cause in said[0] and said[0].endswith("finished chunks are stored; run again to compute the rest")
        # nothing else but progress lines: no Ray Data failure notice, no frame of a traceback
        assert all(line.startswith("[evaluate] ") for line in err.splitlines()[:-1]), err
        # the store stopped cleanly: the stored chunk as it was, the held one not written, no temporary file, no table
        assert {n: (chunks / n).read_bytes() for n in kept} == kept
        assert not (chunks / f"chunk-{held:06d}.json").exists()
        assert not [p for p in store.rglob("*") if ".tmp-" in p.name], "a half-written file was left in the store"
        assert not list(store.rglob("table.parquet"))
    text = log.read_text()
    assert ESC not in text  # Ray's remote traceback is coloured; the log file has it plain
    assert "Traceback" in text and cause in text  # the whole story is kept for whoever needs it


# -- end to end: a successful fine-tune, piped ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_piped_finetune_shows_no_ray_internals_and_its_log_has_no_colour_codes(tmp_path):
    log = tmp_path / "finetune.log"
    argv = [
        RCAT_RAY,
        "finetune",
        "--old",
        "builtin:mlp",
        "--new",
        "builtin:mlp",
        "--data",
        "digits",
        "--train-eps",
        "0.1",
        "--epochs",
        "1",
        "--limit",
        "200",
        "--batch-size",
        "50",
        "--workers",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--storage",
        str(tmp_path / "ray_results"),
        "--store",
        str(tmp_path / "store"),
        "--log-file",
        str(log),
    ]
    run = subprocess.run(argv, cwd=tmp_path, env=_env(), text=True, capture_output=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    assert ESC not in run.stdout + run.stderr, run.stderr
    for internal in ("PlacementGroupCleaner", "TrainController", "Traceback", "Reporting training result"):
        assert internal not in run.stderr, run.stderr
    # the workers' own progress lines still show, with Ray's prefix in plain text
    assert re.search(r"^\(RayTrainWorker pid=\d+\) \[finetune .*\] epoch 1/1 done", run.stderr, re.MULTILINE)
    text = log.read_text()
    assert ESC not in text
    assert re.search(r"rcat_ray\.workers: \(RayTrainWorker pid=\d+\) \[finetune .*\] epoch 1/1 done", text), text
    assert "Reporting training result" in text  # held back from the terminal, kept in the log
