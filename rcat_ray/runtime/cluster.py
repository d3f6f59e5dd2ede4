"""Connecting to Ray: a running cluster when an address is known, else a local instance.

Inside ``ray job submit`` the job must call a bare ``ray.init()`` (docs/architecture.md, "Ray facts the code
relies on", 3): the address then comes from ``RAY_ADDRESS``. A local instance binds to loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set by the CLI before Ray is imported).

How much of Ray's own output reaches the user follows :func:`rcat_ray.runtime.quiet.configure_quiet` (the CLI's
``--verbose``); a library caller that never configured it gets Ray's defaults. Quieting never changes what
a joined cluster does (its auth mode, its logs): only what this driver prints.
"""

from __future__ import annotations

import os

import ray

from rcat_ray.config import WorkerCompute
from rcat_ray.errors import RayStartError
from rcat_ray.runtime import quiet
from rcat_ray.runtime.failures import describe_failure
from rcat_ray.runtime.interrupts import reclaim_sigterm


def ensure_ray(compute: WorkerCompute, *, dashboard: bool = False) -> None:
    """Start or join Ray once per process, as the config and the environment say.

    ``dashboard``: start the local instance with its dashboard, whose state API Ray Train needs to clean up
    after a Train run that was stopped from outside (Tune's schedulers; docs/architecture.md, "Ray facts the code
    relies on", 5).
    """
    if ray.is_initialized():
        return
    address = compute.address or os.environ.get("RAY_ADDRESS")
    quiet.before_ray_init()
    try:
        _init(compute, address, dashboard)
    except Exception as err:  # Ray raises a bare Exception when its local node times out at startup
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RayStartError(f"could not start or join {where}: {describe_failure(err)}") from err
    quiet.after_ray_init()
    reclaim_sigterm()  # ray.init replaced the SIGTERM handler; an interrupted evaluation must still clean up


def _init(compute: WorkerCompute, address: str | None, dashboard: bool) -> None:
    if address:
        # log_to_driver: on a cluster, workers' progress lines (fine-tuning epochs) reach the user only this way
        ray.init(address=address if compute.address else None, log_to_driver=True, **quiet.ray_init_options())
    else:
        # "local": never attach to a cluster that a `ray start` elsewhere on this machine left behind
        ray.init(
            address="local",
            num_cpus=compute.local_cpus,
            include_dashboard=dashboard,
            log_to_driver=True,
            **quiet.ray_init_options(),
        )
