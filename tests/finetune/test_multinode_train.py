"""Fine-tuning on a real multi-node Ray cluster: a head and two 1-CPU worker nodes on this machine.

Ray's own multi-node harness (``ray.cluster_utils.Cluster``) starts the nodes in a subprocess of their own
(:mod:`tests.multinode`, which says why and how the cluster is isolated). The fine-tunes and the sweep run
through the real CLI (``rcat-ray finetune|sweep --address <cluster>``) in subprocesses, as a user would run them.

The head has no CPU, so the two Train workers (1 CPU each) can only be placed on the two worker nodes; each
rank's node id is in the run's history. Scenarios:

(a) 2 workers on 2 nodes end at the weights of a one-process run of the same config (global batches: the
    worker count changes nothing), and each rank read about half of every epoch;
(b) the node of rank 1 is removed while epoch 2 of 3 runs (the workers wait at an epoch gate, a testing aid of
    rcat_ray.runtime.hooks, so "while epoch 2 runs" is a fact, not a race), a replacement node is added, and the
    run resumes from the epoch-1 checkpoint (FailureConfig) on the surviving and the new node, and finishes at the
    weights of a run that never stopped;
(c) a 2-trial sweep (``rcat-ray sweep``): one trial per worker node (each trial records its node), the finished
    trials judged by an evaluation whose chunks spread over both nodes, a choice and its test;
(d) the README's study (``rcat-ray study``): its trials and evaluations spread over both nodes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from rcat_ray.runtime.hooks import EPOCH_GATE_ENV as GATE_ENV
from tests.multinode import ROOT, ClusterProcess, ray_env

N_TRAIN = 1097  # digits' train split

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    gate = Path(tempfile.mkdtemp(prefix="rcat-gate-"))
    c = ClusterProcess(tmp_path_factory.mktemp("cluster") / "cluster.log", env={GATE_ENV: str(gate)})
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
        "output": str(tmp_path / "out" / f"{name}.pt"),
        "out": str(tmp_path / "out"),
        "storage": str(tmp_path / "ray_results"),
        "store": str(tmp_path / "store"),
        "compute": {"num_workers": 2, "cpus_per_worker": 1, "threads_per_worker": 1},
        "max_failures": 1,
    }
    for key, value in kw.items():
        if key in ("num_workers", "cpus_per_worker", "threads_per_worker"):
            raw["compute"][key] = value
        else:
            raw[key] = value
    return raw


def _start_cli(tmp_path: Path, raw: dict, address: str) -> subprocess.Popen:
    config = tmp_path / f"{raw['name']}.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = (tmp_path / f"{raw['name']}.log").open("w")
    cli = Path(sys.executable).parent / "rcat-ray"
    return subprocess.Popen(
        [str(cli), "finetune", "--config", str(config), "--address", address],
        cwd=tmp_path,
        env=ray_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


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
    from rcat_ray.config import parse_config
    from rcat_ray.finetune.config import FinetuneConfig
    from rcat_ray.finetune.run import run_finetune

    # its own Ray Train storage: it has the cluster run's identity (the worker count is not part of it), and in the
    # same storage it would resume that run's finished snapshot instead of training
    raw = _raw(tmp_path, parents, "one-process", num_workers=0, storage=str(tmp_path / "local_results"), **kw)
    outcome = run_finetune(parse_config(FinetuneConfig, raw))
    assert not outcome.reused
    return _weights(outcome.checkpoint)


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


def _registered_checkpoints(tmp_path: Path) -> int:
    """Checkpoints Ray Train's controller has on record for the runs under this test's storage (its checkpoint
    manager snapshot, written after each checkpoint it registers)."""
    count = 0
    for snapshot in (tmp_path / "ray_results").glob("**/checkpoint_manager_snapshot.json"):
        try:
            count = max(count, len(json.loads(snapshot.read_text()).get("checkpoint_results") or []))
        except (OSError, ValueError):  # being written: read again at the next poll
            continue
    return count


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
    manifest = _finish(
        _start_cli(tmp_path, _raw(tmp_path, digits_checkpoints, "two-nodes"), cluster.address), tmp_path, "two-nodes"
    )
    print(f"two-node fine-tune: {time.monotonic() - t0:.1f} s")
    for h in manifest["history"]:
        workers = h["workers"]
        assert [w["rank"] for w in workers] == [0, 1]
        assert {w["node_id"] for w in workers} == set(cluster.workers), "each rank on its own worker node"
        assert [w["rows_read"] for w in workers] == [549, 548]  # each rank read half of the epoch
    _assert_same_weights(tmp_path, "two-nodes", _local_weights(tmp_path, digits_checkpoints))


def _sweep_raw(tmp_path: Path, parents: dict[str, Path]) -> dict:
    """The README's digits sweep (jobs/configs/digits_sweep.yaml) on this test's models and folders."""
    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "digits_sweep.yaml").read_text())
    base = raw["base"]
    base["old"]["path"], base["new"]["path"] = str(parents["old"]), str(parents["new"])
    base["storage"] = str(tmp_path / "ray_results")
    base["store"] = raw["test"]["store"] = str(tmp_path / "store")
    raw.update(storage=str(tmp_path / "ray_results"), out=str(tmp_path / "sweep-out"), num_samples=2)
    return raw


def test_a_two_trial_sweep_runs_one_trial_per_node(cluster, tmp_path, digits_checkpoints):
    _clear(cluster.gate)
    _open_gates(cluster.gate, 1, 2, 3)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_sweep_raw(tmp_path, digits_checkpoints)))
    cli = Path(sys.executable).parent / "rcat-ray"
    t0 = time.monotonic()
    with (tmp_path / "sweep.log").open("w") as log:
        command = [str(cli), "sweep", "--config", str(config), "--address", cluster.address]
        proc = subprocess.run(
            command, cwd=tmp_path, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, timeout=600, check=False
        )
    print(f"two-node sweep: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, (tmp_path / "sweep.log").read_text()[-4000:]
    trials = pd.read_parquet(tmp_path / "sweep-out" / "trials.parquet")
    assert len(trials) == 2 and trials["error"].isna().all() and trials["judged"].all()
    # the head has no CPU and a trial takes one: the two trials ran at once, one on each worker node
    assert set(trials["node_id"]) == set(cluster.workers)
    manifests = (tmp_path / "store").glob("tables/*/chunks/chunk-*.json")
    judged_on = {json.loads(p.read_text())["node"] for p in manifests}
    assert judged_on == set(cluster.workers), "the choice and test evaluations spread over both nodes"
    best = yaml.safe_load((tmp_path / "sweep-out" / "best.yaml").read_text())
    assert best["trial_id"] in set(trials["trial_id"]) and best["finetune"]["loss"]["kind"] == "rcat"
    assert Path(best["checkpoint"]).is_file() and (tmp_path / "sweep-out" / "report.html").is_file()


def test_the_readme_study_spreads_its_trials_and_evaluations_over_the_nodes(cluster, tmp_path, digits_checkpoints):
    """(d) the README's digits study (``rcat-ray study --address``): its pair's trials run on both worker nodes,
    the evaluations' chunks too, and it writes its table."""
    _clear(cluster.gate)
    _open_gates(cluster.gate, 1, 2, 3)
    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "digits_study.yaml").read_text())
    for name in ("old", "new"):
        raw["models"][name]["path"] = str(digits_checkpoints[name])
    raw.update(store=str(tmp_path / "store"), storage=str(tmp_path / "ray_results"), out=str(tmp_path / "out"))
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    cli = Path(sys.executable).parent / "rcat-ray"
    t0 = time.monotonic()
    with (tmp_path / "study.log").open("w") as log:
        command = [str(cli), "study", "--config", str(config), "--address", cluster.address]
        proc = subprocess.run(
            command, cwd=tmp_path, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, timeout=600, check=False
        )
    print(f"two-node study: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, (tmp_path / "study.log").read_text()[-4000:]
    trials = pd.read_parquet(tmp_path / "out" / "pairs" / "old-new" / "sweep" / "trials.parquet")
    assert len(trials) == 3 and trials["judged"].all()
    assert set(trials["node_id"]) == set(cluster.workers), "the pair's trials ran on both worker nodes"
    manifests = (tmp_path / "store").glob("tables/*/chunks/chunk-*.json")
    assert {json.loads(p.read_text())["node"] for p in manifests} == set(cluster.workers)
    assert "RCAT(" in (tmp_path / "out" / "study.md").read_text()


def test_a_removed_node_is_replaced_and_the_run_resumes_from_its_checkpoint(cluster, tmp_path, digits_checkpoints):
    _clear(cluster.gate)
    gate = cluster.gate
    t0 = time.monotonic()
    proc = _start_cli(tmp_path, _raw(tmp_path, digits_checkpoints, "node-loss", epochs=3), cluster.address)
    try:
        _wait_for("both ranks at the start of epoch 2", lambda: len(_arrivals(gate, 1)) == 2, proc)
        # the ranks reported epoch 1's checkpoint before the gate, but Ray Train's controller registers it when it
        # next polls the workers: a node lost before that would leave nothing to resume from (a loaded machine
        # showed it), so the node goes only once the checkpoint is on record
        _wait_for("Ray Train to register the epoch-1 checkpoint", lambda: _registered_checkpoints(tmp_path) >= 1, proc)
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
