"""Starting or joining Ray, the same way for the CLI, jobs, the demo and tests."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from factory.config import PATH_KEYS, ConfigError, FactoryConfig, RayConfig

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


INPUT_KEYS = ("backbone.weights", "annotate.latents", "annotate.candidates", "labels.dir", "prompts.source",
              "pretrain.images", "pretrain.vae_from")
"""Path settings a job only reads: they may sit in the uploaded working folder with the code."""


def unpacked_working_dir() -> str | None:
    """The folder a `ray job submit --working-dir` job runs in (Ray unpacks the upload there, under
    its session's temporary folder, and deletes it later), or None outside such a job."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        return None
    return os.getcwd() if isinstance(job, dict) and (job.get("runtime_env") or {}).get("working_dir") else None


def check_outputs_outlive_the_job(cfg: FactoryConfig) -> None:
    """In a job submitted with `--working-dir`, refuse a path the job writes (or a later job reads back:
    checkpoints, the labeled set, the decoder, datasets) that lies in the unpacked upload: a relative
    `workdir` lands there, Ray deletes it, and the next submission unpacks elsewhere."""
    unpacked = unpacked_working_dir()
    if unpacked is None:
        return
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in INPUT_KEYS or value is None or "://" in value:
            continue
        if os.path.commonpath([os.path.abspath(value), unpacked]) == unpacked:
            raise ConfigError(f"{key}={value} lies in the folder Ray unpacked --working-dir into ({unpacked}), which "
                              "Ray deletes after the job: give workdir (or this setting) as an absolute path on storage "
                              "every node sees, or an s3:// URL")


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
