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
