"""Ray Train scaffolding shared by `factory train` (decoders) and `factory pretrain` (backbones).

Both recipes run a Ray-free training loop on every worker of a `TorchTrainer`, draw each step's
randomness from `step_generator`, keep a resumable state file in each rank-0 checkpoint (tagged with
a hash of the inputs it was fitted on), and publish what they fitted from the last checkpoint
(`storage.publish_tree`). The parts that differ (the loop, what a checkpoint holds, where the result
goes) stay in the recipes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any, Protocol

import torch

from factory import storage

STATE_FILE = "train_state.pt"


class TrainError(RuntimeError):
    """Training could not start or did not finish; the message says why."""


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A step's draws depend only on (seed, rank, step), so a resumed run draws what it would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)


class RunSettings(Protocol):
    """The fields `TrainConfig` and `PretrainConfig` share."""

    run_name: str
    storage_path: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    max_failures: int


def fit_on_ray(worker: Callable[[dict], None], loop_config: dict[str, Any], run: RunSettings, section: str):
    """Run `worker(loop_config)` on `run.num_workers` Ray Train workers; returns the `ray.train.Result`
    (its last checkpoint and metrics). A failed run, or one that reported no checkpoint, raises
    TrainError. `section` names the config section in messages ("train", "pretrain")."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if storage.is_local(run.storage_path):
        storage_path, storage_fs = storage.local_path(run.storage_path), None
    else:  # checkpoints on S3 or another fsspec store, through the same endpoint settings
        storage_fs, storage_path = storage.arrow_filesystem(run.storage_path)
        storage.makedirs(run.storage_path)
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainError(f"{section} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainError(f"{section} in {run.storage_path}/{run.run_name} produced no checkpoint")
    return result


def restore_state(expected_inputs: str, run: RunSettings, section: str, inputs: str,
                  device: torch.device) -> dict | None:
    """On a worker: the state saved in the run's latest checkpoint, or None for a fresh run. A
    checkpoint fitted on different inputs (`inputs` says which, for the message) is refused rather
    than silently continued."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
    if state["inputs_hash"] != expected_inputs:
        raise TrainError(
            f"run {run.run_name!r} in {run.storage_path} was fitted on different inputs ({inputs}); "
            f"choose a new {section}.run_name"
        )
    return state


def report_checkpoint(metrics: dict, rank: int, write: Callable[[str], None]) -> None:
    """On a worker: report `metrics`; rank 0 also writes a checkpoint folder with `write(folder)`.
    `ray.train.report` is a barrier, so every rank must call this at the same steps."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        write(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
