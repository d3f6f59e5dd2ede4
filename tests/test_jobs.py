"""Job entry points on a real Ray cluster: `ray start --head` on loopback, `ray job submit` of the nightly job
for two nights, and the cluster launcher config validated against Ray's autoscaler schema."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rcat_ray.core.models import build_architecture, save_checkpoint
from rcat_ray.history import read_history

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real head node on loopback in its own temp dir. Started with --block, so stopping this one process
    stops exactly this cluster (never `ray stop`, which would kill every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # every port explicit: the session's own Ray (other tests) already holds the default agent ports
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env = (_free_port() for _ in range(7))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    client_env = {**env, "RAY_ADDRESS": address}
    deadline = time.monotonic() + 90
    while True:
        ok = subprocess.run([str(VENV_BIN / "ray"), "job", "list"], env=client_env, capture_output=True, text=True,
                            check=False)  # fmt: skip
        if ok.returncode == 0:
            break
        assert head.poll() is None, head.stdout.read()
        assert time.monotonic() < deadline, f"head did not come up: {ok.stderr}"
        time.sleep(1)
    try:
        yield client_env
    finally:
        head.terminate()  # --block: the head takes its raylet, GCS and dashboard down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(env: dict, sid: str, config: Path) -> subprocess.CompletedProcess:
    """A blocking `ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--submission-id", sid, "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
                                              "excludes": [".venv/", "demo-out/"]}),
             "--", "python", "jobs/nightly.py", "--config", str(config)],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


@pytest.mark.slow
def test_nightly_job_two_nights_on_a_real_cluster(ray_head, tmp_path):
    shape = (1, 8, 8)
    for name, seed in (("production", 0), ("candidate", 1)):
        import torch

        torch.manual_seed(seed)
        save_checkpoint(tmp_path / f"{name}.pt", build_architecture("mlp", num_classes=10, input_shape=shape),
                        arch="mlp", num_classes=10, input_shape=shape)  # fmt: skip
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
        done = _submit(ray_head, f"nightly-{night}", config)
        assert done.returncode == 0, done.stdout + done.stderr
        status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", f"nightly-{night}"], env=ray_head,
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert "succeeded" in (status.stdout + status.stderr).lower()
    history = read_history(str(tmp_path / "history"))
    assert history["date"].tolist() == ["2026-11-21", "2026-11-22"]
    assert history["baseline_chunks_computed"].tolist() == [2, 0]  # night 2 reused the baseline's table
    assert history["candidate_chunks_computed"].tolist() == [2, 0]  # ... and the unchanged candidate's
    # the same submission id twice is refused (a double fire of the cron line)
    again = _submit(ray_head, "nightly-2026-11-22", tmp_path / "2026-11-22.yaml")
    assert again.returncode != 0
    assert len(read_history(str(tmp_path / "history"))) == 2


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
