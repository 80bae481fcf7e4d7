"""Starting or joining Ray, the same way for the CLI, jobs, the demo and tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from factory.config import ConfigError, RayConfig

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
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=dashboard, configure_logging=False, labels={LOCAL_LABEL: "1"})
    else:
        ray.init(address=address, configure_logging=False)
    log.info("ray: %s", ray.cluster_resources())
    return True


LOCAL_LABEL = "factory-local"
"""Node label of a cluster `init_ray` started in this process: nothing else will ever join it."""


def check_placeable(cpus: float, gpus: float, keys: str) -> None:
    """Refuse an actor no node of a local cluster can hold (Ray would wait for it forever, warning
    that the cluster's resources are not enough); on a joined cluster, whose autoscaler may add a
    larger node, only warn. `keys` names the settings that ask for the resources."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus for n in nodes):
        return
    largest = max(nodes, key=lambda n: n["Resources"].get("CPU", 0), default={"Resources": {}})["Resources"]
    have = f"{largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs"
    wanted = f"{cpus:g} CPUs and {gpus:g} GPUs"
    if any(n.get("Labels", {}).get(LOCAL_LABEL) for n in nodes):
        raise ConfigError(f"{keys} ask each actor for {wanted}; the local cluster's node has {have} "
                          "(ray.num_cpus sets its CPUs): lower them or raise ray.num_cpus")
    log.warning("%s ask each actor for %s; no node of the cluster has that now (the largest: %s): it waits "
                "for the autoscaler to add one", keys, wanted, have)


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
