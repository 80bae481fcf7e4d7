"""Shared fixtures: tiny configs, an exported + labeled annotation folder, one Ray cluster per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture
def tiny_cfg(tmp_path):
    """The embedded default, made smaller and faster, writing under tmp_path."""
    from factory.config import load_config

    return load_config(
        None,
        [
            f"workdir={tmp_path}",
            "annotate.num_images=8",
            "train.val_images=2",
            "train.steps=20",
            "train.checkpoint_every=10",
            "decoder.num_heads=3",
            "generate.num_samples=40",
            "generate.shard_size=16",
            "generate.batch_size=8",
        ],
    )


@pytest.fixture
def labeled_dir(tiny_cfg):
    """An exported folder labeled by the demo's stand-in annotator (masks/*.png present)."""
    from factory.annotate import export_images
    from factory.demo import annotate_by_rule

    export_images(tiny_cfg)
    annotate_by_rule(tiny_cfg.annotate.dir)
    return tiny_cfg.annotate.dir


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (start-up costs seconds)."""
    import ray

    from factory.config import RayConfig
    from factory.runtime import init_ray

    init_ray(RayConfig(num_cpus=4))
    yield ray
    ray.shutdown()
