"""Ray Train scaffolding shared by `factory train` (decoders) and `factory pretrain` (backbones).

Both recipes run a Ray-free training loop on every worker of a `TorchTrainer`, draw each step's
randomness from `step_generator`, keep a resumable state file in each rank-0 checkpoint (tagged with
a hash of the inputs it was fitted on), and publish what they fitted from the last checkpoint
(`storage.publish_tree`). The parts that differ (the loop, what a checkpoint holds, where the result
goes) stay in the recipes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any, Protocol

import torch

from factory import storage
from factory.config import ConfigError, stable_hash

STATE_FILE = "train_state.pt"
CHECKPOINT_RECORD = "checkpoint.json"
"""Written last into every checkpoint folder: each file's size and sha256. A checkpoint whose files
do not match it (a copy cut short, a file truncated on the storage) is never loaded."""


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


def fit_on_ray(worker: Callable[[dict], None], loop_config: dict[str, Any], run: RunSettings, section: str,
               inputs: str, parts: dict[str, str]):
    """Run `worker(loop_config)` on `run.num_workers` Ray Train workers; returns the `ray.train.Result`
    (its last checkpoint and metrics). A failed run, or one that reported no checkpoint, raises
    TrainError. `section` names the config section in messages ("train", "pretrain"), `inputs` what
    `loop_config["inputs_hash"]` covers (see `restore_state`), `parts` the same inputs by name, a hash
    each (see `check_run_inputs`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_run_history(run, section)
    check_run_inputs(loop_config["inputs_hash"], parts, run, section, inputs)

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
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train V2 raises its ControllerError / WorkerGroupError from fit()
        if not type(e).__module__.startswith("ray."):
            raise
        raise TrainError(f"{section} in {run.storage_path}/{run.run_name} failed: {root_cause(e)}") from None
    if result.error is not None:
        raise TrainError(f"{section} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainError(f"{section} in {run.storage_path}/{run.run_name} produced no checkpoint")
    storage.write_json(storage.join(run.storage_path, run.run_name, RUN_INPUTS),
                       {"inputs_hash": loop_config["inputs_hash"], "inputs": parts})
    return result


RUN_HISTORY = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a run's checkpoints, which it writes in place: a full disk or a crash while
writing leaves it cut short, and Ray Train then fails to start the run at all."""


def check_run_history(run: RunSettings, section: str) -> None:
    """A run's Ray Train history that is not readable JSON is refused with one line naming it."""
    url = storage.join(run.storage_path, run.run_name, RUN_HISTORY)
    if not storage.exists(url):
        return
    try:
        json.loads(storage.read_bytes(url))
    except ValueError:
        raise TrainError(f"{url} is cut short (written while the disk was full or the run died): delete it to "
                         f"restart the run from step 0, or choose a new {section}.run_name") from None


RUN_INPUTS = "factory_inputs.json"
"""The inputs hash of a run's checkpoints and the same inputs by name (a hash each), written by the
driver after a fit that succeeded (its workers checked the checkpoints against it), so the next run's
driver can refuse other inputs before Ray Train starts its workers, naming what changed."""


def check_run_inputs(expected_inputs: str, parts: dict[str, str], run: RunSettings, section: str, inputs: str) -> None:
    """In the driver: refuse a run whose recorded checkpoints were fitted on other inputs, before any
    worker starts, naming the settings that changed (a ConfigError: the user sets them back or
    chooses a new run name). Without a record (a run that never finished a fit) the workers'
    `restore_state` is the check, as it always is."""
    root = storage.join(run.storage_path, run.run_name)
    url = storage.join(root, RUN_INPUTS)
    if not (storage.exists(url) and storage.exists(storage.join(root, RUN_HISTORY))):
        return
    try:
        record = json.loads(storage.read_bytes(url))
        recorded, recorded_parts = record.get("inputs_hash"), record.get("inputs") or {}
    except (ValueError, AttributeError):
        return  # unreadable: the workers check the checkpoint itself
    if recorded == expected_inputs:
        return
    changed = sorted(k for k in set(parts) | set(recorded_parts) if parts.get(k) != recorded_parts.get(k))
    if not recorded_parts or not changed:  # a record from before parts were kept
        raise ConfigError(str(different_inputs(run, section, inputs)))
    raise ConfigError(f"run {run.run_name!r} in {run.storage_path} was fitted on other inputs: "
                      f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''} changed since; set them back to "
                      f"resume it, or choose a new {section}.run_name")


def hashed_inputs(inputs: object, by_name: dict[str, object]) -> tuple[str, dict[str, str]]:
    """(the hash a run's checkpoints carry, of `inputs` as the recipe has always hashed them; the same
    inputs by name, a hash each, for `check_run_inputs` to name what changed)."""
    return stable_hash(inputs), {k: stable_hash(v) for k, v in by_name.items()}


def different_inputs(run: RunSettings, section: str, inputs: str) -> TrainError:
    return TrainError(f"run {run.run_name!r} in {run.storage_path} was fitted on different inputs ({inputs}); "
                      f"choose a new {section}.run_name")


def check_finite(losses: dict[str, float], step: int, section: str) -> None:
    """In the training loop: a loss that is NaN or infinite means the fit diverged; stop it before it
    is checkpointed or published (its weights would make every label NaN)."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
        raise TrainError(f"{section} diverged at step {step} ({shown}): lower {section}.lr, or check the inputs")


def root_cause(e: BaseException) -> str:
    """`Type: message` of the innermost error inside Ray Train's wrappers (a worker's or the
    controller's failure), on one line."""
    for _ in range(20):
        failures = getattr(e, "worker_failures", None)
        inner = (next(iter(failures.values()), None) if isinstance(failures, dict) and failures else None) \
            or getattr(e, "controller_failure", None) or getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(" ")]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


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
        verify_checkpoint(d, f"{run.storage_path}/{run.run_name}")
        state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
    if state["inputs_hash"] != expected_inputs:
        raise different_inputs(run, section, inputs)
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
        record_checkpoint(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _file_digests(folder: str) -> dict[str, list]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel == CHECKPOINT_RECORD:
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = [os.path.getsize(path), h.hexdigest()]
    return dict(sorted(out.items()))


def record_checkpoint(folder: str) -> None:
    """Write `CHECKPOINT_RECORD` (each file's size and sha256) into a finished checkpoint folder, last."""
    with open(os.path.join(folder, CHECKPOINT_RECORD), "w") as f:
        json.dump({"files": _file_digests(folder)}, f, indent=1, sort_keys=True)


def verify_checkpoint(folder: str, where: str) -> None:
    """Raise TrainError naming the file unless `folder` holds exactly the files its record lists, each
    of the recorded size and sha256 (a checkpoint is whole or refused, never half-read)."""
    path = os.path.join(folder, CHECKPOINT_RECORD)
    name = os.path.basename(os.path.normpath(folder))
    try:
        with open(path) as f:
            want = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"checkpoint {name} in {where} is incomplete: no readable {CHECKPOINT_RECORD} "
                         f"({type(e).__name__}); delete it to resume from the one before") from None
    got = _file_digests(folder)
    for rel in sorted(set(want) | set(got)):
        if got.get(rel) != want.get(rel):
            found = "missing" if rel not in got else f"{got[rel][0]} bytes" + (
                "" if rel not in want or got[rel][0] != want[rel][0] else " with another sha256")
            raise TrainError(f"checkpoint {name} in {where}: {rel} is {found}, its record says "
                             f"{want[rel][0] if rel in want else 'nothing'}"
                             f"{' bytes' if rel in want else ''}; delete the checkpoint to resume from the one before")
