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
    assert ray_init == [{"num_cpus": 2, "include_dashboard": started, "configure_logging": False}]


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
