"""Fit the decoder on Ray Train: one recipe for every backbone and decoder.

Each worker loads the backbone, prepares the training data of the decoder's objective (regenerated
GAN images for the Style Interpreter, inverted real images for the perception decoder; see
`factory.recipes.objectives`) and runs the same loop: one loss per step on a batch drawn from (seed, rank,
step), DDP across workers (gloo on CPU, nccl on GPU), validation and a checkpoint every
`train.checkpoint_every` steps. Checkpoints carry the decoder, its config and label names;
re-running with the same `train.run_name` resumes from the last one.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict

import torch

from factory import config as config_lib
from factory import storage
from factory.backbones import backbone_identity, load_backbone
from factory.config import FactoryConfig, TrainConfig
from factory.data.annotations import LabeledSet, load_labeled_set
from factory.data.labeled_photos import RealLabeledSet, load_real_labeled_set
from factory.decoders import unwrap
from factory.decoders.files import METRICS_FILE, MODEL_FILE, save_decoder
from factory.fingerprint import safetensors_fingerprint
from factory.recipes.objectives import objective_for
from factory.recipes.ray_train import (
    CHECKPOINT_RECORD,
    STATE_FILE,
    check_finite,
    fit_on_ray,
    hashed_inputs,
    report_checkpoint,
    restore_state,
    step_generator,
    verify_checkpoint,
)

log = logging.getLogger(__name__)


INPUTS = "labeled set, backbone, decoder or train settings"
"""What `inputs_hash` covers, as messages name it."""


def inputs_hash(cfg: FactoryConfig, labeled_path: str) -> str:
    """What a checkpoint was fitted on; resuming onto different inputs is refused."""
    return run_inputs(cfg, safetensors_fingerprint(labeled_path))[0]


def input_parts(cfg: FactoryConfig, labeled_path: str) -> dict[str, str]:
    """`inputs_hash`'s inputs by name, a hash each, so a refusal can say which of them changed."""
    return run_inputs(cfg, safetensors_fingerprint(labeled_path))[1]


def run_inputs(cfg: FactoryConfig, labeled_fingerprint: str) -> tuple[str, dict[str, str]]:
    """(`inputs_hash`, `input_parts`) in one pass, from the labeled set's fingerprint read once."""
    t = cfg.train
    settings = {k: getattr(t, k) for k in ("batch_pixels", "batch_images", "lr", "lr_schedule", "class_balanced",
                                           "val_images", "seed")}
    views = extra_views(t)  # keyed only when on: earlier checkpoints keep their hash
    parts = {"labeled": labeled_fingerprint, "backbone": asdict(cfg.backbone), "decoder": asdict(cfg.decoder)}
    return hashed_inputs(
        {**parts, "train": [*settings.values(), *([views] if views else [])]},
        {"the labeled set": labeled_fingerprint,
         **{f"{section}.{k}": v for section in ("backbone", "decoder") for k, v in parts[section].items()},
         **{f"train.{k}": v for k, v in (settings | views).items()}})


def extra_views(t) -> dict:
    """The settings of `train` that add views of the labeled photos (`flip`, `inversion_draws`),
    those that are on only."""
    on = {"flip": True} if t.flip else {}
    return on | ({"inversion_draws": t.inversion_draws} if t.inversion_draws != 1 else {})


def labeled_file(cfg: FactoryConfig) -> str:
    """A local path holding `train.labeled`: the file itself, or, for an `s3://` (or other) URL that
    every Ray Train worker can reach, a copy fetched once per machine (`storage.fetch`)."""
    url = cfg.train.labeled
    return url if storage.is_local(url) else storage.fetch(url)


def load_training_set(cfg: FactoryConfig) -> LabeledSet | RealLabeledSet:
    """The labeled set `train.labeled` names, of the kind the backbone trains on: annotated generated
    images (stylegan2) or imported real images (diffusion)."""
    if cfg.backbone.kind == "diffusion":
        return load_real_labeled_set(labeled_file(cfg))
    return load_labeled_set(labeled_file(cfg))


class TrainingSetError(ValueError):
    """The labeled set does not fit the config (bad input the user can fix: exit 2); the message names both."""


def check_training_set(cfg: FactoryConfig, labeled: LabeledSet | RealLabeledSet, backbone_hash: str) -> None:
    """The labeled set fits the config: tasks, label names, enough images, and (GAN path) the backbone."""
    where = cfg.train.labeled
    if isinstance(labeled, RealLabeledSet):
        missing = [t for t in cfg.decoder.tasks if t not in labeled.tasks]
        if missing or labeled.classes != cfg.labels.classes or labeled.keypoint_names != cfg.labels.keypoints:
            raise TrainingSetError(
                f"{where} holds {labeled.tasks} labels for classes {labeled.classes} (keypoints "
                f"{labeled.keypoint_names}), but the config asks for decoder.tasks={cfg.decoder.tasks} with "
                f"{cfg.labels.classes} ({cfg.labels.keypoints}); re-run `factory labels import`"
            )
    else:
        augmented = extra_views(cfg.train)
        if augmented:
            raise TrainingSetError(
                f"{', '.join(f'train.{k}={v}' for k, v in augmented.items())}: augments the perception decoder's inverted real images (diffusion "
                "path); the Style Interpreter learns from generated images' own pixels, set it back"
            )
        expected = cfg.label_names()
        if labeled.task != cfg.decoder.task or labeled.label_names != expected:
            raise TrainingSetError(
                f"{where} holds {labeled.task} labels {labeled.label_names}, but the config asks for "
                f"decoder.task={cfg.decoder.task!r} with {expected}; re-run `factory annotate import`"
            )
        if backbone_hash != labeled.backbone_hash:
            raise TrainingSetError(
                f"{where} was labeled on backbone {labeled.backbone_hash[:12]}, the config builds "
                f"{backbone_hash[:12]}; check backbone.weights / backbone.init_seed"
            )
    if len(labeled.files) <= cfg.train.val_images:
        raise TrainingSetError(
            f"{where} has {len(labeled.files)} labeled images; train.val_images={cfg.train.val_images} "
            "would leave none to train on"
        )


def fit(
    cfg: FactoryConfig,
    labeled: LabeledSet | RealLabeledSet,
    device: torch.device,
    rank: int = 0,
    restore: Callable[[torch.nn.Module, torch.optim.Optimizer], int] | None = None,
    report: Callable[[dict, torch.nn.Module, torch.optim.Optimizer, int], None] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """The training loop of one worker, free of Ray so it can be tested directly."""
    backbone = load_backbone(cfg.backbone, device)
    objective = objective_for(cfg, labeled, backbone, device)
    model = wrap(objective.build(backbone.feature_channels).to(device))
    del backbone  # the objective holds the features it needs
    return fit_objective(cfg.train, objective, model, rank, restore, report)


def fit_objective(
    t: TrainConfig,
    objective,
    model: torch.nn.Module,
    rank: int = 0,
    restore: Callable[[torch.nn.Module, torch.optim.Optimizer], int] | None = None,
    report: Callable[[dict, torch.nn.Module, torch.optim.Optimizer, int], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """`fit`'s loop for any objective (its `loss(model, generator)` and `evaluate(model)`) and model:
    Adam at `train.lr` under `train.lr_schedule`, each step's draws from (seed, rank, step)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    step = start_step = restore(model, optimizer) if restore else 0
    if step > t.steps:
        raise ValueError(f"train.steps={t.steps} is fewer than the {step} steps this run has already taken: raise "
                         "train.steps to train on, or choose a new train.run_name to train afresh")
    metrics: dict[str, float] = {}
    loss_sum, loss_count = 0.0, 0
    while True:
        if step == t.steps or (step and step % t.checkpoint_every == 0 and loss_count):
            metrics = {"step": step, "start_step": start_step}
            if loss_count:  # a run resumed at its last step takes no step: it has no loss to report
                metrics["loss"] = loss_sum / loss_count
            metrics.update(objective.evaluate(model))
            if report:
                report(metrics, model, optimizer, step)
            loss_sum, loss_count = 0.0, 0
        if step >= t.steps:
            break
        unwrap(model).train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(t, step)
        loss = objective.loss(model, step_generator(t.seed, rank, step))
        value = loss.item()
        check_finite({"loss": value}, step, "train")  # before the step: the weights stay finite
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, loss_count = loss_sum + value, loss_count + 1
        step += 1
    return unwrap(model), metrics


def learning_rate(t, step: int) -> float:
    """The learning rate of `step` under `train.lr_schedule`: a function of the step (and
    `train.steps`) alone, so a resumed run continues the same schedule; raising `train.steps` on
    resume stretches what is left of it."""
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(step, t.steps) / t.steps))
    return t.lr


def _worker(loop_config: dict) -> None:
    """Ray Train entry point on each worker: restore, fit, checkpoint through ray.train.report."""
    import ray.train
    import ray.train.torch

    cfg = config_lib.from_dict(loop_config["cfg"])
    storage.configure(cfg.storage)
    labeled = load_training_set(cfg)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    expected_inputs = loop_config["inputs_hash"]

    def restore(model, optimizer) -> int:
        state = restore_state(expected_inputs, cfg.train, "train", INPUTS, device)
        if state is None:
            return 0
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def report(metrics, model, optimizer, step) -> None:
        def write(d: str) -> None:
            save_decoder(
                d, model, cfg.decoder, cfg.label_names(), loop_config["in_channels"],
                loop_config["backbone_hash"], loop_config["config_yaml"], cfg.labels.keypoints,
                loop_config["feature_names"],
            )
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "inputs_hash": expected_inputs}
            torch.save(state, os.path.join(d, STATE_FILE))

        report_checkpoint(metrics, rank, write)

    fit(cfg, labeled, device, rank, restore, report, wrap=ray.train.torch.prepare_model)


def finite_metrics(reported: dict) -> dict[str, float]:
    """The numeric metrics of a fit that were measured: NaN (e.g. a keypoint error when no keypoint is
    visible in the held-out images) is left out with a warning, not written as JSON's invalid `NaN`."""
    numbers = {k: v for k, v in reported.items() if isinstance(v, (int, float))}
    for k in sorted(k for k, v in numbers.items() if not math.isfinite(v)):
        log.warning("metric %s is %s: nothing to measure it on; left out of %s", k, numbers[k], METRICS_FILE)
    return {k: v for k, v in numbers.items() if math.isfinite(v)}


def check_inputs(cfg: FactoryConfig):
    """Step 1 of `train`: the labeled set exists and matches the configured tasks, labels and backbone;
    returns it and the backbone's identity. Cheap, and Ray-free: the CLI runs it before a cluster starts."""
    storage.configure(cfg.storage)
    labeled = load_training_set(cfg)
    backbone = backbone_identity(cfg.backbone)
    check_training_set(cfg, labeled, backbone.weights_hash)
    warn_unlabeled(cfg, labeled)
    return labeled, backbone


def warn_unlabeled(cfg: FactoryConfig, labeled) -> None:
    """Warn about classes no labeled pixel shows and keypoints no labeled image shows (visibility 0
    in all): the decoder cannot learn them, yet it will still predict them on every sample."""
    if labeled.masks is not None:
        classes = cfg.labels.classes
        pixels = torch.bincount(labeled.masks.flatten().long(), minlength=len(classes))[: len(classes)]
        absent = [c for c, n in zip(classes, pixels.tolist()) if n == 0]
        if absent:
            log.warning("%s: no labeled pixel of class %s in its %d images: the decoder cannot learn what it "
                        "has not seen; label some, or drop them from labels.classes", cfg.train.labeled,
                        ", ".join(absent), len(labeled.files))
    if labeled.keypoints is not None:
        seen = (labeled.keypoints[..., 2] > 0).any(dim=0).tolist()
        unseen = [k for k, s in zip(cfg.labels.keypoints, seen) if not s]
        if unseen:
            log.warning("%s: keypoint %s is visible in none of its %d images: the decoder cannot learn where it "
                        "is, yet every sample will carry a guess for it", cfg.train.labeled, ", ".join(unseen),
                        len(labeled.files))


def train(cfg: FactoryConfig, checked: tuple | None = None) -> dict[str, float]:
    """Fit the decoder described by `cfg` and publish it to `generate.decoder`; returns final metrics.
    `checked`: what `check_inputs(cfg)` returned, when the caller ran it already (before starting Ray)."""
    # 1. Check inputs.
    labeled, backbone = checked or check_inputs(cfg)
    fingerprint = safetensors_fingerprint(labeled_file(cfg))
    hashed, parts = run_inputs(cfg, fingerprint)

    # 2. Fit on Ray Train.
    result = fit_on_ray(
        _worker,
        {
            "cfg": config_lib.to_dict(cfg),
            "config_yaml": config_lib.to_yaml(cfg),
            "in_channels": backbone.feature_channels,
            "backbone_hash": backbone.weights_hash,
            "feature_names": backbone.feature_names,
            "inputs_hash": hashed,
        },
        cfg.train,
        "train",
        INPUTS,
        parts,
    )

    # 3. Publish the decoder from the last checkpoint, the weights last (readers take a folder
    #    without them as "no decoder").
    target = cfg.generate.decoder
    with result.checkpoint.as_directory() as d:
        verify_checkpoint(d, f"{cfg.train.storage_path}/{cfg.train.run_name}")
        storage.publish_tree(d, target, ignore=shutil.ignore_patterns(STATE_FILE, CHECKPOINT_RECORD), last=MODEL_FILE)
    metrics = finite_metrics(result.metrics)
    storage.write_json(storage.join(target, METRICS_FILE), {
        "metrics": metrics, "steps": cfg.train.steps, "val_images": cfg.train.val_images,
        "labeled_set": {"path": cfg.train.labeled, "fingerprint": fingerprint, "images": len(labeled.files)},
        "inputs_hash": hashed,
    })
    log.info("decoder written to %s; final metrics %s", target, metrics)
    return metrics
