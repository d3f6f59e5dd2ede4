"""Ray's process environment, set before Ray is imported, and Ray shut down after an interrupt.

Ray-free at import on purpose: the variables below only take effect when they are set before ``import ray``
(docs/architecture.md, "Ray facts the code relies on").
"""

from __future__ import annotations

import os
import sys


def prepare_local_ray_env(address: str | None) -> None:
    """A local Ray binds to loopback and sends no usage statistics; Ray Train's teardown takes 1-2 s instead of 5
    (its health-check interval). Nothing is set when the run joins a cluster."""
    if not address and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def shutdown_ray_if_started() -> None:
    """Shut Ray down when this process started or joined it (and never import Ray just to find out)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
