"""Fine-tuning on a real multi-node Ray cluster: a head and two 1-CPU worker nodes on this machine.

Ray's own multi-node harness (``ray.cluster_utils.Cluster``) starts the nodes. It runs in a subprocess of its
own (this file run as ``python -m tests.test_multinode_train cluster``), never in the pytest process: the rest of
the suite keeps one session-wide local Ray in pytest (conftest ``ray_session``), and a Cluster in the same
process would share (and on shutdown reset) Ray's process-global state. The fine-tunes run through the real
CLI (``rcat-ray finetune --address <cluster>``) in subprocesses, as a user would run them.

The head has no CPU, so the two Train workers (1 CPU each) can only be placed on the two worker nodes; each
rank's node id is in the run's history. Scenarios:

(a) 2 workers on 2 nodes end at the weights of a one-process run of the same config (global batches: the
    worker count changes nothing), and each rank read about half of every epoch;
(b) the node of rank 1 is removed while epoch 2 of 3 runs (the workers wait at an epoch gate, a testing aid of
    train.py, so "while epoch 2 runs" is a fact, not a race), a replacement node is added, and the run resumes
    from the epoch-1 checkpoint (FailureConfig) on the surviving and the new node, and finishes at the weights
    of a run that never stopped.

Isolation: every process gets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (all Ray listeners on 127.0.0.1) and
RAY_AUTH_MODE=disabled; the GCS and agent ports are picked free by Ray (port 0), so they cannot clash with the
session Ray; the cluster does not write (or delete) /tmp/ray/ray_current_cluster, so ``address="auto"`` users
elsewhere on the machine never see it; a finalizer shuts the cluster down (and kills its process group if
that fails).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 1097  # digits' train split

pytestmark = [pytest.mark.slow]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


class ClusterProcess:
    """The Cluster in its subprocess, driven by one-line commands (``add``, ``remove <node id>``, ``shutdown``)."""

    def __init__(self, gate: Path, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_multinode_train", "cluster"],
            cwd=ROOT, env=_env(RCAT_RAY_TEST_EPOCH_GATE=str(gate)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, start_new_session=True,
        )  # fmt: skip
        self.address = self._reply()["address"]
        self.workers = [self.add(), self.add()]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process ended (rc {self.proc.poll()}); see {self.log.name}")
        return json.loads(line)

    def _send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def add(self) -> str:
        return self._send("add")["node_id"]

    def remove(self, node_id: str) -> None:
        self._send(f"remove {node_id}")
        self.workers.remove(node_id)

    def shutdown(self) -> None:
        try:
            if self.proc.poll() is None:
                self._send("shutdown")
                self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - whatever went wrong, the processes must not outlive the test
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started (start_new_session)
                self.proc.wait(timeout=30)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    gate = Path(tempfile.mkdtemp(prefix="rcat-gate-"))
    c = ClusterProcess(gate, tmp_path_factory.mktemp("cluster") / "cluster.log")
    c.gate = gate
    yield c
    c.shutdown()
    shutil.rmtree(gate, ignore_errors=True)


def _raw(tmp_path: Path, parents: dict[str, Path], name: str, **kw) -> dict:
    raw = {
        "old": {"source": "checkpoint", "name": "old", "path": str(parents["old"])},
        "new": {"source": "checkpoint", "name": "new", "path": str(parents["new"])},
        "data": {"name": "digits", "split": "train"},
        "loss": {"kind": "pcat", "alpha": 1.0, "beta": 2.0},  # a batch mean: 1 and 2 workers train alike
        "train_attack": {"kind": "fgsm-rs", "eps": 0.1},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "epochs": 2,
        "batch_size": 64,
        "validation": {"samples": 50},
        "name": name,
        "out": str(tmp_path / "out"),
        "storage": str(tmp_path / "ray_results"),
        "store": str(tmp_path / "store"),
        "num_workers": 2,
        "cpus_per_worker": 1,
        "threads_per_worker": 1,
        "max_failures": 1,
    }
    raw.update(kw)
    return raw


def _start_cli(tmp_path: Path, raw: dict, address: str) -> subprocess.Popen:
    config = tmp_path / f"{raw['name']}.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = (tmp_path / f"{raw['name']}.log").open("w")
    cli = Path(sys.executable).parent / "rcat-ray"
    return subprocess.Popen([str(cli), "finetune", "--config", str(config), "--address", address],
                            cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def _finish(proc: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 400) -> dict:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / f"{name}.log").read_text()
    assert rc == 0, f"rcat-ray finetune exited {rc}:\n{log[-4000:]}"
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


def _local_weights(tmp_path: Path, parents: dict[str, Path], **kw) -> dict[str, torch.Tensor]:
    """The same fine-tune in this process with one worker (Train's local mode): the reference weights."""
    from rcat_ray.config import FinetuneConfig, parse_config
    from rcat_ray.distributed.train import run_finetune

    cfg = parse_config(FinetuneConfig, _raw(tmp_path, parents, "one-process", num_workers=0, **kw))
    return _weights(run_finetune(cfg).checkpoint)


def _weights(path) -> dict[str, torch.Tensor]:
    from rcat_ray.config import ModelConfig
    from rcat_ray.core.models import load_model

    m = load_model(ModelConfig(source="checkpoint", name="t", path=str(path)), num_classes=10, input_shape=(1, 8, 8))
    return m.module.state_dict()


def _assert_same_weights(tmp_path: Path, name: str, reference: dict[str, torch.Tensor]) -> None:
    tuned = _weights(tmp_path / "out" / f"{name}.pt")
    for key, expected in reference.items():
        torch.testing.assert_close(tuned[key], expected, atol=1e-5, rtol=0, msg=key)


def _open_gates(gate: Path, *epochs: int) -> None:
    for e in epochs:
        (gate / f"open-e{e}").touch()


def _clear(gate: Path) -> None:
    for f in gate.iterdir():
        f.unlink()


def _arrivals(gate: Path, epoch: int) -> dict[int, dict]:
    """rank -> what the worker that arrived last at the epoch's gate wrote (node id, host, pid)."""
    out = {}
    for f in sorted(gate.glob(f"arrived-e{epoch}-r*"), key=lambda p: p.stat().st_mtime):
        text = f.read_text()
        if text:
            info = json.loads(text)
            out.setdefault(info["rank"], []).append(info)
    return out


def _wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the fine-tune ended (rc {proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_two_workers_on_two_nodes_train_the_one_process_model(cluster, tmp_path, digits_checkpoints):
    _clear(cluster.gate)
    _open_gates(cluster.gate, 1, 2, 3)
    t0 = time.monotonic()
    manifest = _finish(_start_cli(tmp_path, _raw(tmp_path, digits_checkpoints, "two-nodes"), cluster.address),
                       tmp_path, "two-nodes")  # fmt: skip
    print(f"two-node fine-tune: {time.monotonic() - t0:.1f} s")
    for h in manifest["history"]:
        workers = h["workers"]
        assert [w["rank"] for w in workers] == [0, 1]
        assert {w["node_id"] for w in workers} == set(cluster.workers), "each rank on its own worker node"
        assert [w["rows_read"] for w in workers] == [549, 548]  # each rank read half of the epoch
    _assert_same_weights(tmp_path, "two-nodes", _local_weights(tmp_path, digits_checkpoints))


def test_a_removed_node_is_replaced_and_the_run_resumes_from_its_checkpoint(cluster, tmp_path, digits_checkpoints):
    _clear(cluster.gate)
    gate = cluster.gate
    t0 = time.monotonic()
    proc = _start_cli(tmp_path, _raw(tmp_path, digits_checkpoints, "node-loss", epochs=3), cluster.address)
    try:
        _wait_for("both ranks at the start of epoch 2", lambda: len(_arrivals(gate, 1)) == 2, proc)
        first = {rank: infos[-1] for rank, infos in _arrivals(gate, 1).items()}
        doomed = first[1]["node_id"]
        survivor = first[0]["node_id"]
        assert {doomed, survivor} == set(cluster.workers)
        cluster.remove(doomed)  # rank 1's node goes away while epoch 2 (index 1) runs
        replacement = cluster.add()

        def restarted() -> bool:
            again = _arrivals(gate, 1)
            pids = {rank: {i["pid"] for i in infos} for rank, infos in again.items()}
            return len(pids) == 2 and all(len(p) == 2 for p in pids.values())

        _wait_for("the restarted worker group at the start of epoch 2", restarted, proc)
        _open_gates(gate, 1, 2)
        manifest = _finish(proc, tmp_path, "node-loss")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"node-loss fine-tune: {time.monotonic() - t0:.1f} s")
    history = manifest["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert [h["attempt_start_epoch"] for h in history] == [0, 1, 1], "resumed at epoch 2 from the epoch-1 checkpoint"
    assert {w["node_id"] for w in history[0]["workers"]} == {doomed, survivor}
    for h in history[1:]:
        assert {w["node_id"] for w in h["workers"]} == {survivor, replacement}
        assert [w["rows_read"] for w in h["workers"]] == [549, 548]
    _assert_same_weights(tmp_path, "node-loss", _local_weights(tmp_path, digits_checkpoints, epochs=3))


# -- the cluster process ----------------------------------------------------------------------------------------
def _serve_cluster() -> None:
    """Start a head (no CPU) and answer commands on stdin with one JSON line each, until ``shutdown``."""
    import ray._common.utils
    import ray._private.utils

    # keep this cluster out of /tmp/ray/ray_current_cluster: another Ray user of the machine must not find it
    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    from ray.cluster_utils import Cluster

    def reply(**kw) -> None:
        print(json.dumps(kw), flush=True)

    head = {
        "num_cpus": 0,
        "include_dashboard": False,
        "dashboard_agent_listen_port": None,  # a free port, not the default 52365 another Ray may hold
        "object_store_memory": 100 * 2**20,
        # a killed node is declared dead after ~3 s instead of ~15 s
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    }
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    nodes = {}
    reply(address=cluster.address)
    try:
        for line in sys.stdin:
            command, *args = line.split()
            if command == "add":
                node = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
                cluster.wait_for_nodes()
                nodes[node.node_id] = node
                reply(node_id=node.node_id)
            elif command == "remove":
                cluster.remove_node(nodes.pop(args[0]), allow_graceful=False)
                reply(removed=args[0])
            elif command == "shutdown":
                break
    finally:
        cluster.shutdown()
    reply(shutdown=True)


if __name__ == "__main__" and sys.argv[1:] == ["cluster"]:
    _serve_cluster()
