"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes started by Ray's own harness.

Why a subprocess. The rest of the suite keeps one session-wide local Ray in the pytest process (conftest
``ray_session``); a ``ray.cluster_utils.Cluster`` in the same process would share, and on shutdown reset, Ray's
process-global state. So the Cluster lives in a process of its own (this module run as ``python -m
tests.multinode``), created with ``connect=False``, and answers one-line commands on stdin with one JSON line
each: ``add [cpus]`` (a worker node; its node id), ``remove <node id>`` (killed, not drained: a lost machine),
``shutdown``. Tests then drive the cluster through the real CLI (``--address <address>``) in subprocesses.

Authentication. The cluster runs with Ray's token authentication on, as a user's cluster does: every process
of a test (the cluster's and each CLI run) gets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` naming one
random token of this test process (:func:`auth_token_file`, a private temporary file), the way Ray documents for
every node and client of a cluster; a process without them cannot join.

Isolation. Every process gets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (all Ray listeners on 127.0.0.1); the GCS,
raylet and agent ports are picked free (port 0), so they cannot clash with
the session Ray (:meth:`ClusterProcess.gcs_port` lets a test check); the cluster never writes (or deletes)
/tmp/ray/ray_current_cluster, so ``address="auto"`` users elsewhere on the machine never find it; and
:meth:`ClusterProcess.shutdown` (call it from a finalizer) stops the cluster, or kills the process group this
helper started when that fails.

Environment variables given to :class:`ClusterProcess` reach every Ray worker (they inherit the raylets'
environment): the way to switch on a testing aid inside workers.

Shared by tests/evaluate/test_multinode_eval.py and tests/finetune/test_multinode_train.py (a plain module, not a
conftest, so importing it has no side effects).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def auth_token_file() -> Path:
    """This test process's Ray token: a random one in a file only its owner can read, made on first use and
    removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="ray-token-"))
    atexit.register(shutil.rmtree, folder, True)
    path = folder / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def ray_env(**extra: str) -> dict[str, str]:
    """The environment for every process of a multi-node test: loopback only, token authentication with this
    test process's token, quick Train teardown, the project importable, and no inherited ``RAY_ADDRESS`` (which
    would attach elsewhere) or ``RAY_AUTH_TOKEN`` (which would take precedence over the token file)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(auth_token_file()),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


class ClusterProcess:
    """The Cluster in its subprocess: a head with ``head_cpus`` CPUs and ``workers`` worker nodes of
    ``worker_cpus`` CPUs each. ``address`` is the GCS address to pass as ``--address``; ``workers`` the worker
    nodes' Ray node ids (in the order they were added)."""

    def __init__(
        self,
        log: Path,
        *,
        workers: int = 2,
        worker_cpus: int = 1,
        head_cpus: int = 0,
        env: dict[str, str] | None = None,
    ):
        self.log_path = log
        self.log = log.open("w")
        self.worker_cpus = worker_cpus
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.multinode", str(head_cpus)],
            cwd=ROOT,
            env=ray_env(**(env or {})),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        self.workers: list[str] = []
        try:
            self.address = self._reply()["address"]
            for _ in range(workers):
                self.add()
        except BaseException:
            self.shutdown()
            raise

    @property
    def gcs_port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process ended (rc {self.proc.poll()}); see {self.log_path}")
        return json.loads(line)

    def _send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def add(self, cpus: int | None = None) -> str:
        """Start one more worker node; returns its Ray node id."""
        node_id = self._send(f"add {cpus if cpus is not None else self.worker_cpus}")["node_id"]
        self.workers.append(node_id)
        return node_id

    def remove(self, node_id: str) -> None:
        """Kill a worker node's processes at once (no draining), as a lost machine would go."""
        self._send(f"remove {node_id}")
        self.workers.remove(node_id)

    def shutdown(self) -> None:
        """Stop the cluster; whatever goes wrong, none of its processes outlives the test."""
        try:
            if self.proc.poll() is None:
                self._send("shutdown")
                self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - the processes must not outlive the test
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this helper started (start_new_session)
                self.proc.wait(timeout=30)
        finally:
            self.log.close()


def _serve(head_cpus: int) -> None:
    """Start the head and answer commands on stdin with one JSON line each, until ``shutdown`` or end of input."""
    import ray._common.utils
    import ray._private.utils

    # keep this cluster out of /tmp/ray/ray_current_cluster: another Ray user of the machine must not find it
    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    from ray.cluster_utils import Cluster

    def reply(**kw) -> None:
        print(json.dumps(kw), flush=True)

    head = {
        "num_cpus": head_cpus,
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
                node = cluster.add_node(num_cpus=int(args[0]) if args else 1, object_store_memory=100 * 2**20)
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


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if sys.argv[1:] else 0)
