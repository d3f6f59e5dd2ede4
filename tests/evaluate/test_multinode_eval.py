"""Evaluation on a real multi-node Ray cluster: a head without CPUs and two 1-CPU worker nodes on this machine.

The cluster is Ray's own harness in a subprocess (:mod:`tests.multinode`); the evaluations run through the real
CLI (``rcat-ray evaluate|nightly --address <cluster>``) in subprocesses, as a user would run them. The head has
no CPU, so the two evaluation actors (1 CPU each) can only run on the two worker nodes; each chunk's manifest
records the Ray node id that computed it. The one-node reference runs in this process on the session Ray.

Scenarios:
(a) an evaluation spreads its chunks over both worker nodes, and its tables hold the same rows as a one-node run;
(c) the nightly gate runs on the cluster (both tables, the verdict and the report with its images);
(b) a worker node is killed while its actor holds a chunk (the actors wait at a gate, a testing aid of
    ``rcat_ray.runtime.hooks``, so "in the middle of a chunk" is a fact, not a race): the run finishes on
    the remaining node, or stops saying to run again and the re-run computes only the missing chunks; the
    tables equal the one-node run's either way. It runs last: it leaves the cluster with one worker node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from rcat_ray.runtime.hooks import CHUNK_GATE_ENV as GATE_ENV
from tests.multinode import ClusterProcess, ray_env

pytestmark = [pytest.mark.slow, pytest.mark.ray]

N_SAMPLES, CHUNK = 400, 50  # 8 chunks per model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_session):
    gate = Path(tempfile.mkdtemp(prefix="rcat-eval-gate-"))
    t0 = time.monotonic()
    c = ClusterProcess(tmp_path_factory.mktemp("cluster") / "cluster.log", env={GATE_ENV: str(gate)})
    print(f"cluster start: {time.monotonic() - t0:.1f} s")
    c.gate = gate
    # the session Ray of this process and the cluster listen on different ports
    assert c.gcs_port != int(ray_session.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    yield c
    c.shutdown()
    shutil.rmtree(gate, ignore_errors=True)


def _settings(tmp_path: Path, store: str = "store") -> dict:
    return {
        "data": {"name": "digits", "split": "test", "limit": N_SAMPLES},
        "attack": {"eps": 0.1, "attacks": ["apgd-ce", "apgd-dlr"], "n_iter": 10, "seed": 0},
        "chunk_size": CHUNK,
        "store": str(tmp_path / store),
        "compute": {"num_workers": 2, "cpus_per_worker": 1, "threads_per_worker": 1},
    }


def _evaluate_raw(tmp_path: Path, checkpoints: dict[str, Path], store: str = "store") -> dict:
    models = [{"source": "checkpoint", "path": str(checkpoints[k])} for k in ("old", "new")]
    return {**_settings(tmp_path, store), "models": models}


def _start(tmp_path: Path, name: str, command: str, raw: dict, address: str) -> subprocess.Popen:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    cli = Path(sys.executable).parent / "rcat-ray"
    out, err = (tmp_path / f"{name}.json").open("w"), (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen(
        [str(cli), command, "--config", str(config), "--address", address, "--json"],
        cwd=tmp_path,
        env=ray_env(),
        stdout=out,
        stderr=err,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _json_out(tmp_path: Path, name: str) -> dict:
    """The CLI's ``--json`` result. Ray prints some cluster events (a raylet that died) to the driver's stdout
    as well, so the JSON object is found among those lines."""
    text = (tmp_path / f"{name}.json").read_text()
    start = 0 if text.startswith("{") else text.index("\n{") + 1
    return json.JSONDecoder().raw_decode(text[start:])[0]


def _log(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()[-4000:]


def _chunk_manifests(store: Path) -> dict[tuple[str, int], dict]:
    return {
        (p.parts[-3], json.loads(p.read_text())["chunk_id"]): json.loads(p.read_text())
        for p in store.glob("tables/*/chunks/chunk-*.json")
    }


def _assert_same_as_one_node(tmp_path: Path, checkpoints: dict[str, Path], store: Path, keys: list[str]) -> None:
    """The same evaluation on the session Ray of this process (one node): the same tables, row for row."""
    from rcat_ray.config import parse_config
    from rcat_ray.evaluate.config import EvaluateConfig
    from rcat_ray.evaluate.run import run_evaluate

    raw = _evaluate_raw(tmp_path, checkpoints, store="one-node")
    raw["compute"] = {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 1}
    outcomes, _ = run_evaluate(parse_config(EvaluateConfig, raw))
    assert [o.key for o in outcomes] == keys
    for o in outcomes:
        here = pq.read_table(tmp_path / "one-node" / o.table_path)
        there = pq.read_table(store / o.table_path)
        assert here.num_rows == N_SAMPLES and there.equals(here), o.model_name


def _clear(gate: Path) -> None:
    for f in gate.iterdir():
        f.unlink()


def test_an_evaluation_spreads_over_both_nodes_and_equals_a_one_node_run(cluster, tmp_path, digits_checkpoints):
    _clear(cluster.gate)
    (cluster.gate / "open-all").touch()
    t0 = time.monotonic()
    rc = _finish(
        _start(tmp_path, "two-nodes", "evaluate", _evaluate_raw(tmp_path, digits_checkpoints), cluster.address)
    )
    print(f"two-node evaluation (2 models x 8 chunks): {time.monotonic() - t0:.1f} s")
    assert rc == 0, _log(tmp_path, "two-nodes")
    tables = _json_out(tmp_path, "two-nodes")["tables"]
    assert [(t["chunks"], t["chunks_computed"]) for t in tables] == [(8, 8), (8, 8)]
    manifests = _chunk_manifests(tmp_path / "store")
    assert len(manifests) == 16
    assert {m["node"] for m in manifests.values()} == set(cluster.workers), "chunks computed on both worker nodes"
    assert len({m["host"] for m in manifests.values()}) == 1  # one machine: the host name cannot tell nodes apart
    _assert_same_as_one_node(tmp_path, digits_checkpoints, tmp_path / "store", [t["key"] for t in tables])


def test_the_nightly_gate_runs_on_the_cluster(cluster, tmp_path, digits_checkpoints):
    _clear(cluster.gate)
    (cluster.gate / "open-all").touch()
    raw = {
        **_settings(tmp_path),
        "pair": "digits-multinode",
        "baseline": {"source": "checkpoint", "path": str(digits_checkpoints["old"]), "label": "production"},
        "candidate": {"source": "checkpoint", "path": str(digits_checkpoints["new"])},
        "gates": {"max_nfr": 0.5, "min_acc": 0.1},
        "bootstrap": {"n_resamples": 100},
        "history": str(tmp_path / "history"),
        "out": str(tmp_path / "nightly-out"),
        "notify": {"kind": "stdout"},
        "date": "2026-01-02",
    }
    t0 = time.monotonic()
    rc = _finish(_start(tmp_path, "nightly", "nightly", raw, cluster.address))
    print(f"two-node nightly: {time.monotonic() - t0:.1f} s")
    assert rc == 0, _log(tmp_path, "nightly")
    (verdict_path,) = (tmp_path / "nightly-out").glob("2026-01-02-*/verdict.json")
    verdict = json.loads(verdict_path.read_text())
    assert verdict["pair"] == "digits-multinode" and verdict["passed"] is True
    assert verdict["baseline"]["chunks_computed"] == verdict["candidate"]["chunks_computed"] == 8
    nodes = {m["node"] for m in _chunk_manifests(tmp_path / "store").values()}
    assert nodes == set(cluster.workers)
    flips = (verdict_path.parent / "flips" / "report.html").read_text()
    assert "Images are not shown" not in flips  # clean images read from the store's sample set


def test_a_node_lost_in_the_middle_of_a_chunk(cluster, tmp_path, digits_checkpoints):
    gate = cluster.gate
    _clear(gate)
    raw = _evaluate_raw(tmp_path, digits_checkpoints)
    t0 = time.monotonic()
    proc = _start(tmp_path, "node-loss", "evaluate", raw, cluster.address)

    def arrivals() -> dict[str, str]:
        """chunk (``<plan>-<chunk id>``) -> node of the actor that last announced it at the gate."""
        out = {}
        for f in gate.glob("arrived-*"):
            text = f.read_text()
            if text:
                out[f.name.removeprefix("arrived-")] = json.loads(text)["node_id"]
        return out

    def wait_for(what: str, predicate, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert proc.poll() is None, f"the evaluation ended while waiting for {what}:\n{_log(tmp_path, 'node-loss')}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def stored() -> dict:
        return _chunk_manifests(tmp_path / "store")

    try:
        # each node finishes one chunk, then holds the next ones at the gate
        wait_for("a chunk at the gate on each node", lambda: set(arrivals().values()) == set(cluster.workers))
        first = {}
        for chunk, node in sorted(arrivals().items()):
            if node not in first.values():
                first[chunk] = node
                (gate / f"open-{chunk}").touch()
        wait_for("one stored chunk per node", lambda: len(stored()) == 2)
        wait_for(
            "a held chunk on each node",
            lambda: {n for c, n in arrivals().items() if c not in first} == set(cluster.workers),
        )
        doomed, survivor = cluster.workers
        held = sorted(c for c, n in arrivals().items() if n == doomed and c not in first)
        cluster.remove(doomed)  # killed while its actor holds chunks `held`
        lost_at = time.monotonic()
        while proc.poll() is None:  # from now on only the surviving node's chunks pass the gate
            for chunk, node in arrivals().items():
                if node == survivor:
                    (gate / f"open-{chunk}").touch()
            assert time.monotonic() - lost_at < 300, "the evaluation did not finish after the node was lost"
            time.sleep(0.1)
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - t0
    log = _log(tmp_path, "node-loss")
    manifests = stored()
    if rc != 0:  # stopped: the message says what to do, and the same command continues
        assert "run again" in log, log
        (gate / "open-all").touch()
        before = len(manifests)
        rc = _finish(_start(tmp_path, "node-loss-again", "evaluate", raw, cluster.address))
        assert rc == 0, _log(tmp_path, "node-loss-again")
        tables = _json_out(tmp_path, "node-loss-again")["tables"]
        assert sum(t["chunks_computed"] for t in tables) == 16 - before
        assert sum(t["chunks_reused"] for t in tables) == before
        manifests = stored()
        outcome = f"stopped, re-run computed {16 - before} chunks"
    else:
        tables = _json_out(tmp_path, "node-loss")["tables"]
        assert all(t["complete"] for t in tables)
        outcome = "finished on the remaining node"
    print(f"node loss: {outcome}; {elapsed:.1f} s (held on the lost node: {', '.join(held)})")
    assert len(manifests) == 16
    plan_of = {t["key"]: i for i, t in enumerate(tables)}  # gate names are "<plan index>-<chunk id>"
    by_chunk = {f"{plan_of[k]}-{c}": m["node"] for (k, c), m in manifests.items()}
    for chunk in held:  # the chunks the lost node held were computed by the survivor
        assert by_chunk.get(chunk) == survivor, (chunk, by_chunk)
    assert {m["node"] for m in manifests.values()} == {doomed, survivor}
    _assert_same_as_one_node(tmp_path, digits_checkpoints, tmp_path / "store", [t["key"] for t in tables])
