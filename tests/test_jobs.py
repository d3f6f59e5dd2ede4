"""Job entry points on a real Ray cluster: `ray start --head` on loopback with Ray's default token
authentication on, `ray job submit` refused without the token and run with it, the nightly job for two nights,
and the cluster launcher config validated against Ray's autoscaler schema (every node gets the token)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from rcat_ray.core.models import build_architecture, save_checkpoint
from rcat_ray.nightly.history import read_history

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
#: what a submit without the token prints (Ray 2.60's dashboard answers 401; the job CLI raises this)
MISSING_TOKEN = "AuthenticationError: Authentication required: Unauthorized: Missing authentication token"
WRONG_TOKEN = "AuthenticationError: Authentication failed: Forbidden: Invalid authentication token"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A real head node on loopback, started as a user starts one: a token made once with
    `ray get-auth-token --generate` (into ``~/.ray/auth_token`` of a temporary home, never the developer's), then
    a plain `ray start --head` with no RAY_AUTH_* variable, so token authentication is on because Ray 2.60 turns
    it on when it finds a token. ``env`` is how a submitting shell is meant to look (``RAY_AUTH_MODE=token``,
    the README's fix); ``without_token`` is the same shell without it (the newcomer's).

    Own temp dir and every port explicit (the session's own Ray holds the default agent ports); started with
    --block, so stopping this one process stops exactly this cluster (never `ray stop`, which would kill every
    Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    home = Path(temp_dir) / "home"
    home.mkdir()
    user = {k: v for k, v in os.environ.items() if k not in (*AUTH_VARIABLES, "RAY_ADDRESS")}
    user.update(
        HOME=str(home),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}:{os.environ['PATH']}",
    )
    subprocess.run(
        [str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=user, capture_output=True, check=True, timeout=60
    )
    assert (home / ".ray" / "auth_token").is_file()
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env = (_free_port() for _ in range(7))
    log = Path(temp_dir) / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [
                str(VENV_BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent_http}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={rt_env}",
                "--num-cpus=2",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
            ],
            env=user,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash}"
    without_token = {**user, "RAY_ADDRESS": address}
    client_env = {**without_token, "RAY_AUTH_MODE": "token"}
    try:
        deadline = time.monotonic() + 90
        while True:
            ok = subprocess.run(
                [str(VENV_BIN / "ray"), "job", "list"], env=client_env, capture_output=True, text=True, check=False
            )
            if ok.returncode == 0:
                break
            assert head.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"head did not come up: {ok.stderr}"
            time.sleep(1)
        # Ray's own default switched authentication on (nothing in the head's environment asked for it)
        assert "Token authentication is enabled for this Ray cluster" in log.read_text(), log.read_text()
        yield SimpleNamespace(env=client_env, without_token=without_token, home=home, address=address)
    finally:
        head.terminate()  # --block: the head takes its raylet, GCS and dashboard down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    """A blocking `ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def _submit(env: dict, sid: str, config: Path) -> subprocess.CompletedProcess:
    """The nightly job, submitted as jobs/nightly.crontab does."""
    return _job_submit(
        env,
        "--submission-id",
        sid,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps({"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}, "excludes": [".venv/", "demo-out/"]}),
        "--",
        "python",
        "jobs/nightly.py",
        "--config",
        str(config),
    )


@pytest.mark.slow
def test_a_submit_needs_the_clusters_token(ray_head, tmp_path):
    """The README's cluster section as a newcomer meets it: without RAY_AUTH_MODE=token (the token file is
    right there in ~/.ray) the submit is refused with the authentication error; with another machine's token it
    is refused as invalid; with the cluster's token the job runs, and its driver joins the cluster."""
    job = ["--", "python", "-c", "import ray; ray.init(); print('joined', len(ray.nodes()), 'node')"]

    refused = _job_submit(ray_head.without_token, "--submission-id", "no-token", *job)
    assert refused.returncode != 0
    assert MISSING_TOKEN in refused.stdout + refused.stderr, refused.stdout + refused.stderr

    other = tmp_path / "laptop-token"
    other.write_text("0" * 64)  # e.g. the token a laptop's own local runs created
    wrong = _job_submit({**ray_head.env, "RAY_AUTH_TOKEN_PATH": str(other)}, "--submission-id", "wrong-token", *job)
    assert wrong.returncode != 0
    assert WRONG_TOKEN in wrong.stdout + wrong.stderr, wrong.stdout + wrong.stderr

    done = _job_submit(ray_head.env, "--submission-id", "with-token", *job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "joined 1 node" in done.stdout and "succeeded" in done.stdout, done.stdout
    listed = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "list"], env=ray_head.env, capture_output=True, text=True, check=True
    )
    assert "with-token" in listed.stdout  # ... and the refused ones never reached the cluster
    assert "no-token" not in listed.stdout and "wrong-token" not in listed.stdout


@pytest.mark.slow
def test_nightly_job_two_nights_on_a_real_cluster(ray_head, tmp_path):
    shape = (1, 8, 8)
    for name, seed in (("production", 0), ("candidate", 1)):
        import torch

        torch.manual_seed(seed)
        save_checkpoint(
            tmp_path / f"{name}.pt",
            build_architecture("mlp", num_classes=10, input_shape=shape),
            arch="mlp",
            num_classes=10,
            input_shape=shape,
        )
    base = {
        "pair": "digits",
        "baseline": {"source": "checkpoint", "name": "production", "path": str(tmp_path / "production.pt")},
        "candidate": {"source": "checkpoint", "name": "candidate", "path": str(tmp_path / "candidate.pt")},
        "data": {"name": "digits", "split": "test", "limit": 100},
        "attack": {"eps": 0.1, "n_iter": 3},
        "chunk_size": 50,
        "store": str(tmp_path / "store"),
        "compute": {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 1},
        "bootstrap": {"n_resamples": 100},
        "history": str(tmp_path / "history"),
        "out": str(tmp_path / "out"),
    }
    for night in ("2026-11-21", "2026-11-22"):
        config = tmp_path / f"{night}.yaml"
        config.write_text(yaml.safe_dump({**base, "date": night}))
        done = _submit(ray_head.env, f"nightly-{night}", config)
        assert done.returncode == 0, done.stdout + done.stderr
        status = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "status", f"nightly-{night}"],
            env=ray_head.env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert "succeeded" in (status.stdout + status.stderr).lower()
    history = read_history(str(tmp_path / "history"))
    assert history["date"].tolist() == ["2026-11-21", "2026-11-22"]
    assert history["baseline_chunks_computed"].tolist() == [2, 0]  # night 2 reused the baseline's table
    assert history["candidate_chunks_computed"].tolist() == [2, 0]  # ... and the unchanged candidate's
    # the same submission id twice is refused (a double fire of the cron line)
    again = _submit(ray_head.env, "nightly-2026-11-22", tmp_path / "2026-11-22.yaml")
    assert again.returncode != 0
    assert len(read_history(str(tmp_path / "history"))) == 2


@pytest.mark.slow
def test_study_job_on_a_real_cluster_and_resubmitted_reuses_everything(ray_head, tmp_path):
    study = {
        "name": "digits-job",
        "models": {
            "old": {"source": "builtin", "name": "mlp", "seed": 0},
            "new": {"source": "builtin", "name": "small_cnn", "seed": 1},
        },
        "pairs": [{"old": "old", "new": "new"}],
        "methods": ["at", "rcat"],
        "rcat_grid": [[0.5, 0.4]],
        "seeds": [0],
        "finetune": {
            "data": {"name": "digits", "split": "train", "limit": 128},
            "train_attack": {"eps": 0.1},
            "epochs": 1,
            "batch_size": 64,
            "validation": {"samples": 20, "attack": {"eps": 0.1, "attacks": ["apgd-ce"], "n_iter": 1}},
            "compute": {"num_workers": 0, "threads_per_worker": 1},
        },
        "choice": {"samples": 50, "chunk_size": 50, "attack": {"eps": 0.1, "attacks": ["apgd-ce"], "n_iter": 2}},
        "tolerance": 1.0,
        "test": {"data": {"name": "digits", "split": "test", "limit": 50}, "attack": {"eps": 0.1, "n_iter": 2}},
        "compute": {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 1},
        "store": str(tmp_path / "store"),
        "storage": str(tmp_path / "ray_results"),
        "out": str(tmp_path / "out"),
        "bootstrap": {"n_resamples": 50},
    }
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    runtime_env = json.dumps({"excludes": [".venv/", "demo-out/", "bench/out/"]})
    args = ("--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--", "python", "jobs/study.py")
    first = _job_submit(ray_head.env, *args, "--config", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "RCAT(0.5,0.4)" in first.stdout and "old -> new" in first.stdout
    table = (tmp_path / "out" / "study.csv").read_text()
    chunks = sorted(str(p) for p in (tmp_path / "store").rglob("*.parquet"))
    finetuned = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "finetuned").glob("*.pt")}
    assert len(finetuned) == 2
    # submitted again (a retried nightly run, a resubmission after a lost node): the same table, nothing recomputed
    second = _job_submit(ray_head.env, *args, "--config", str(config))
    assert second.returncode == 0, second.stdout + second.stderr
    assert (tmp_path / "out" / "study.csv").read_text() == table
    assert sorted(str(p) for p in (tmp_path / "store").rglob("*.parquet")) == chunks
    assert {p: p.stat().st_mtime_ns for p in finetuned} == finetuned


def test_cluster_yaml_validates_against_the_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu = config["available_node_types"]["worker.gpu"]
    assert gpu["min_workers"] == 0 and gpu["resources"]["GPU"] == 1
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0

    broken = copy.deepcopy(config)
    del broken["head_node_type"]
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))
    typo = copy.deepcopy(config)
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(typo))


def test_cluster_yaml_gives_every_node_the_token(tmp_path):
    """`ray up cluster.yaml` copies the local token (~/.ray/auth_token) to one path on every node, every `ray start`
    runs with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH naming that path, and shells on the nodes get both.
    The commands are run as written by bash, with a stand-in `ray` that records what `ray start` would see (from
    an environment without any RAY_AUTH_* variable, so only the commands themselves can set them)."""
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    (token_path,) = (remote for remote, local in config["file_mounts"].items() if local == "~/.ray/auth_token")
    assert token_path.startswith("/"), "an absolute path: `~` is /home/ray inside the container, not /home/ubuntu"
    assert "RAY_AUTH_TOKEN=" not in text, "the token travels as a file, never inside the config"

    bin_dir, home, seen = tmp_path / "bin", tmp_path / "home", tmp_path / "seen"
    bin_dir.mkdir()
    home.mkdir()
    fake = bin_dir / "ray"
    fake.write_text('#!/bin/sh\n[ "$1" = start ] && echo "$RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH" >> "$SEEN"\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "SEEN": str(seen), "RAY_HEAD_IP": "10.0.0.1"}

    def run(command: str) -> None:
        subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, check=False, timeout=30)

    starts = [
        c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        run(command)
    assert seen.read_text().splitlines() == [f"token {token_path}"] * 2

    shell_setup = [c for c in config["setup_commands"] if ".bashrc" in c]
    assert shell_setup, "no setup command gives the nodes' shells the token"
    for _ in range(2):  # `ray up` runs setup commands again on every update: the line is added once
        for command in shell_setup:
            run(command)
    assert (home / ".bashrc").read_text().count("RAY_AUTH_MODE") == 1
    shell = subprocess.run(
        ["bash", "-c", "source ~/.bashrc; echo $RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.split() == ["token", token_path]


def test_scheduled_submissions_carry_the_token():
    """The crontab submits with RAY_AUTH_MODE=token (the token from the cron user's ~/.ray/auth_token or
    RAY_AUTH_TOKEN_PATH); the KubeRay RayJob and RayCronJob ask the operator for token authentication
    (``rayClusterSpec.authOptions.mode: token``: KubeRay >= 1.5.1 makes the Secret and gives the token to every
    Ray container and to the submitter)."""
    crontab = (ROOT / "jobs" / "nightly.crontab").read_text().splitlines()
    assert "RAY_AUTH_MODE=token" in crontab
    assert not any("RAY_AUTH_MODE=disabled" in line for line in crontab if not line.startswith("#"))
    rayjob = yaml.safe_load((ROOT / "jobs" / "kuberay-rayjob.yaml").read_text())
    cronjob = yaml.safe_load((ROOT / "jobs" / "kuberay-raycronjob.yaml").read_text())
    for spec in (rayjob["spec"]["rayClusterSpec"], cronjob["spec"]["jobTemplate"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token"}
        assert tuple(int(p) for p in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth needs Ray >= 2.52
