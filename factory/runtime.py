"""Starting or joining Ray, the same way for the CLI, jobs, the demo and tests."""

from __future__ import annotations

import logging
import os

from factory.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join `ray.address` (or, inside a Ray job, the job's cluster), else start a local cluster with
    `ray.num_cpus` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers must import `factory` the way the driver does, even from a source checkout.
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set for drivers of `ray job submit`
    if address is None:
        ray.init(num_cpus=cfg.num_cpus, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    log.info("ray: %s", ray.cluster_resources())
