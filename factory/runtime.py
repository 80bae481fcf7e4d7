"""Starting or joining Ray, the same way for the CLI, jobs, the demo and tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from factory.config import RayConfig

log = logging.getLogger(__name__)

TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's wait for a fit's workers to start (`ray.train_start_timeout_s`)."""


def init_ray(cfg: RayConfig, training: bool = False) -> bool:
    """Join `ray.address` (or, inside a Ray job, the job's cluster), else start a local cluster with
    `ray.num_cpus` logical CPUs and the dashboard if `ray.dashboard` says so (None: only when the
    caller fits on Ray Train, `training`: its controller needs the State API the dashboard serves).
    Returns False if Ray was already initialized in this process (the caller then leaves it running),
    True if this call connected."""
    import ray

    # Ray Train reads these from the driver's environment when a fit starts and passes them on.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault(TRAIN_START_TIMEOUT_ENV, f"{cfg.train_start_timeout_s:g}")
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set for drivers of `ray job submit`
    if address is None:
        dashboard = training if cfg.dashboard is None else cfg.dashboard
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=dashboard, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    log.info("ray: %s", ray.cluster_resources())
    return True


@contextmanager
def ray_session(cfg: RayConfig, training: bool = False) -> Iterator[None]:
    """Ray for the duration of a job: connected on entry, shut down on exit if this job connected
    (`training` as for `init_ray`)."""
    import ray

    started = init_ray(cfg, training)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
