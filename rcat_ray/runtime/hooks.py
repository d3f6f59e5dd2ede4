"""Testing aids: gates that hold a worker at a known point, and a fault injector. Never part of a user's run.

Every hook is a no-op unless its ``RCAT_RAY_TEST_*`` environment variable is set, and every gate gives up with a
``TimeoutError`` after ``RCAT_RAY_TEST_GATE_DEADLINE_S`` seconds (600 by default). A worker sees a
variable set in its own environment (a cluster started with it) or forwarded by the driver through the loop
config (:func:`forwarded`, :func:`receive`): Ray workers keep the environment their node started with.
Tests import the names below instead of spelling the variables.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: A folder; each Ray Data evaluation actor writes ``arrived-<plan>-<chunk id>`` (its node id and pid as JSON)
#: there and waits before attacking that chunk until ``open-all`` or ``open-<plan>-<chunk id>`` exists.
CHUNK_GATE_ENV = "RCAT_RAY_TEST_CHUNK_GATE"
#: A folder; every fine-tuning worker waits at the start of each epoch after the first until ``open-e<epoch>``
#: exists there, after writing ``arrived-e<epoch>-r<rank>-p<pid>`` (its rank, node id, host and pid as JSON).
EPOCH_GATE_ENV = "RCAT_RAY_TEST_EPOCH_GATE"
#: An epoch; the fine-tuning worker of rank 1 (rank 0 alone) raises once, the first time it starts that epoch,
#: and leaves a marker ``.fault-injected`` in the run's storage folder so a restarted group passes.
FAIL_ONCE_AT_EPOCH_ENV = "RCAT_RAY_TEST_FAIL_ONCE_AT_EPOCH"
#: Seconds a gate waits for its ``open-*`` file before it raises TimeoutError.
GATE_DEADLINE_ENV = "RCAT_RAY_TEST_GATE_DEADLINE_S"
DEFAULT_GATE_DEADLINE_S = 600.0
#: The key under which a driver forwards the variables set in its environment to its workers.
LOOP_CONFIG_KEY = "test_hooks"
FAULT_MARKER = ".fault-injected"

_HOOK_VARIABLES = (CHUNK_GATE_ENV, EPOCH_GATE_ENV, FAIL_ONCE_AT_EPOCH_ENV, GATE_DEADLINE_ENV)
_received: dict[str, str] = {}  # forwarded by the driver (see receive)


def _value(name: str) -> str | None:
    return os.environ.get(name) or _received.get(name) or None


def forwarded() -> dict[str, Any]:
    """``{LOOP_CONFIG_KEY: {variable: value}}`` for the hook variables set here, to add to a loop config; empty
    (nothing added) when none is set, as in every user's run."""
    found = {name: os.environ[name] for name in _HOOK_VARIABLES if os.environ.get(name)}
    return {LOOP_CONFIG_KEY: found} if found else {}


def receive(loop_config: Mapping[str, Any]) -> None:
    """In a worker: take the hook variables its driver forwarded (a no-op without them)."""
    _received.update(loop_config.get(LOOP_CONFIG_KEY) or {})


def _deadline() -> float:
    return float(_value(GATE_DEADLINE_ENV) or DEFAULT_GATE_DEADLINE_S)


def _wait(gate: Path, names: tuple[str, ...]) -> None:
    """Wait until one of ``names`` exists in ``gate``; TimeoutError at the deadline (the test stopped driving it)."""
    seconds = _deadline()
    deadline = time.monotonic() + seconds
    while not any((gate / name).exists() for name in names):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"test gate {gate}: none of {', '.join(names)} appeared within {seconds:g} s "
                f"(set by {CHUNK_GATE_ENV} or {EPOCH_GATE_ENV}; the deadline is {GATE_DEADLINE_ENV})"
            )
        time.sleep(0.05)


def chunk_gate(plan: int, chunk_id: int, node: str | None) -> None:
    """Hold an evaluation chunk until the test opens it (see CHUNK_GATE_ENV)."""
    folder = _value(CHUNK_GATE_ENV)
    if not folder:
        return
    gate, name = Path(folder), f"{plan}-{chunk_id}"
    (gate / f"arrived-{name}").write_text(json.dumps({"node_id": node, "pid": os.getpid()}))
    _wait(gate, ("open-all", f"open-{name}"))


def epoch_gate(epoch: int, rank: int, worker: Callable[[], dict[str, Any]]) -> None:
    """Hold every fine-tuning epoch after the first until the test opens it (see EPOCH_GATE_ENV); ``worker``
    says where this rank runs (written into its arrival file)."""
    folder = _value(EPOCH_GATE_ENV)
    if not folder or epoch == 0:
        return
    gate = Path(folder)
    (gate / f"arrived-e{epoch}-r{rank}-p{os.getpid()}").write_text(json.dumps(worker()))
    _wait(gate, (f"open-e{epoch}",))


def fail_once_at_epoch(epoch: int, rank: int, world: int, run_folder: Callable[[], Path]) -> None:
    """Raise once on rank 1 (or 0) at the start of the epoch FAIL_ONCE_AT_EPOCH_ENV names; the marker in
    ``run_folder()`` (the run's storage folder, shared by a restarted worker group) makes it once."""
    value = _value(FAIL_ONCE_AT_EPOCH_ENV)
    if value is None or epoch != int(value) or rank != min(1, world - 1):
        return
    marker = run_folder() / FAULT_MARKER
    if marker.exists():
        return
    _wait_for_registered_epoch(run_folder(), epoch - 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} epoch {epoch}\n")
    raise RuntimeError(f"injected fault on rank {rank} at epoch {epoch}")


def _wait_for_registered_epoch(run_folder: Path, epoch: int, deadline_s: float = 120.0) -> None:
    """Until Ray Train's controller has registered the checkpoint of ``epoch`` (its snapshot file in the run
    folder names it): a fault raised sooner can reach the controller before that report does, and the restart
    then begins from scratch instead of from the last epoch, which is not the failure the tests mean."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    stop = time.monotonic() + deadline_s
    while epoch >= 0 and time.monotonic() < stop:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if int(latest.get("metrics", {}).get("epoch", -1)) >= epoch:
                return
        except (OSError, ValueError):
            pass  # not written yet, or being replaced
        time.sleep(0.1)
