"""How a command starts its local Ray cluster: the dashboard (and the State API it serves, which Ray
Train's controller watches itself through) only where the command fits on Ray Train, unless
`ray.dashboard` says otherwise; joining a cluster never starts one."""

import pytest

from factory.config import RayConfig
from factory.runtime import init_ray


@pytest.fixture
def ray_init(monkeypatch):
    """`ray.init` recorded instead of run (the session's own cluster stays untouched)."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


@pytest.mark.parametrize(("dashboard", "training", "started"), [
    (None, True, True),    # train / pretrain / demo / jobs: Ray Train needs the State API
    (None, False, False),  # builds: 11 processes and ~0.9 GB saved
    (False, True, False),  # the user's word wins
    (True, False, True),
])
def test_the_dashboard_starts_where_ray_train_needs_it(ray_init, dashboard, training, started):
    assert init_ray(RayConfig(num_cpus=2, dashboard=dashboard), training=training) is True
    assert ray_init == [{"num_cpus": 2, "include_dashboard": started, "configure_logging": False,
                         "labels": {"factory-local": "1"}}]


def test_joining_a_cluster_leaves_the_dashboard_to_its_head(ray_init):
    init_ray(RayConfig(address="ray://head:10001", dashboard=True), training=True)
    assert ray_init == [{"address": "ray://head:10001", "configure_logging": False}]


def test_ray_train_waits_for_its_workers_as_long_as_the_config_says(ray_init, monkeypatch):
    """Ray Train's default (60 s) was too short once on a busy 2-core machine; the driver's environment
    carries the config's wait to the fit, and a variable the user set wins."""
    import os

    from factory.runtime import TRAIN_START_TIMEOUT_ENV

    monkeypatch.delenv(TRAIN_START_TIMEOUT_ENV, raising=False)
    init_ray(RayConfig(num_cpus=2), training=True)
    assert os.environ[TRAIN_START_TIMEOUT_ENV] == "300"
    monkeypatch.setenv(TRAIN_START_TIMEOUT_ENV, "45")
    init_ray(RayConfig(num_cpus=2, train_start_timeout_s=600), training=True)
    assert os.environ[TRAIN_START_TIMEOUT_ENV] == "45"
    monkeypatch.delenv(TRAIN_START_TIMEOUT_ENV)
    init_ray(RayConfig(num_cpus=2, train_start_timeout_s=90.5), training=True)
    assert os.environ[TRAIN_START_TIMEOUT_ENV] == "90.5"
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert TRAIN_START_TIMEOUT_ENV in ENV_VARS_TO_PROPAGATE  # Ray Train passes it to its controller


def test_a_bad_train_start_timeout_is_refused_naming_it():
    from factory.config import ConfigError

    with pytest.raises(ConfigError, match="ray.train_start_timeout_s"):
        RayConfig(train_start_timeout_s=0)


def test_an_actor_no_node_can_hold_is_refused_on_a_local_cluster_and_warned_about_on_a_joined_one(monkeypatch, caplog):
    """Ray would wait forever for an actor asking more than the local cluster has (`generate.cpus_per_actor=5`
    with `ray.num_cpus=4`); a joined cluster's autoscaler may still add a node that fits."""
    import ray

    from factory.config import ConfigError
    from factory.runtime import check_placeable

    node = {"Alive": True, "Resources": {"CPU": 4.0}, "Labels": {"factory-local": "1"}}
    monkeypatch.setattr(ray, "nodes", lambda: [node, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}])
    check_placeable(4, 0, "generate.cpus_per_actor / gpus_per_actor")
    with pytest.raises(ConfigError, match=r"generate.cpus_per_actor / gpus_per_actor ask each actor for 5 CPUs and 0 GPUs; "
                                          r"the local cluster's node has 4 CPUs and 0 GPUs"):
        check_placeable(5, 0, "generate.cpus_per_actor / gpus_per_actor")
    with pytest.raises(ConfigError, match="1 GPUs"):
        check_placeable(1, 1, "generate.cpus_per_actor / gpus_per_actor")
    node["Labels"] = {}
    with caplog.at_level("WARNING", logger="factory.runtime"):
        check_placeable(5, 0, "generate.cpus_per_actor / gpus_per_actor")
    assert "waits for the autoscaler" in caplog.text


def test_a_local_cluster_without_cpus_is_refused_naming_the_key():
    from factory.config import ConfigError

    with pytest.raises(ConfigError, match="ray.num_cpus must be >= 1, got 0"):
        RayConfig(num_cpus=0)


def test_a_job_s_outputs_may_not_lie_in_the_working_folder_ray_unpacks_and_deletes(tmp_path, monkeypatch):
    """`ray job submit --working-dir . -- python jobs/generate.py configs/demo.yaml`: the config's relative
    workdir resolves inside Ray's unpacked upload, which Ray deletes after the job: refused, naming it."""
    import json
    import os

    from factory.config import ConfigError, load_config
    from factory.runtime import check_outputs_outlive_the_job

    unpacked = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    unpacked.mkdir(parents=True)
    monkeypatch.chdir(unpacked)
    relative = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                        "demo.yaml"))
    check_outputs_outlive_the_job(relative)  # not a job: a local run writes where the user stands
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    with pytest.raises(ConfigError, match=r"annotate.dir=.*_ray_pkg_1/factory-work/annotations lies in the folder Ray "
                                          r"unpacked --working-dir into"):
        check_outputs_outlive_the_job(relative)
    shared = load_config(None, [f"workdir={tmp_path}/shared", "generate.output=s3://bucket/ds"])
    check_outputs_outlive_the_job(shared)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))  # no --working-dir
    check_outputs_outlive_the_job(relative)
