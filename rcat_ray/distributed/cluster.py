"""Connecting to Ray: a running cluster when an address is known, else a local instance.

Inside ``ray job submit`` the job must call a bare ``ray.init()`` (RAY_NOTES gotcha 5): the address then
comes from ``RAY_ADDRESS``. A local instance binds to loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
set by the CLI before Ray is imported).
"""

from __future__ import annotations

import os

import ray

from rcat_ray.config import ComputeConfig


def ensure_ray(compute: ComputeConfig, *, dashboard: bool = False) -> None:
    """Start or join Ray once per process, as the config and the environment say.

    ``dashboard``: start the local instance with its dashboard, whose state API Ray Train needs to clean up
    after a Train run that was stopped from outside (Tune's schedulers; RAY_NOTES gotcha 8).
    """
    if ray.is_initialized():
        return
    address = compute.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address if compute.address else None, log_to_driver=True)
    else:
        # "local": never attach to a cluster that a `ray start` elsewhere on this machine left behind
        ray.init(address="local", num_cpus=compute.local_cpus, include_dashboard=dashboard, log_to_driver=False)
