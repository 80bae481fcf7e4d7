"""Fit the decoder on Ray Train.

The labeled images are regenerated from their seeds on every worker and their features kept at
native resolution; each step samples pixels (class-balanced by default) and gathers their feature
vectors, so no full-resolution feature tensor of the labeled set ever exists. Workers run DDP
(gloo on CPU, nccl on GPU). Checkpoints carry the decoder, its config and label names; re-running
with the same `train.run_name` resumes from the last one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from factory import config as config_lib
from factory import storage
from factory.backbones import load_backbone
from factory.config import FactoryConfig
from factory.decoders import MODEL_FILE, build_decoder, save_decoder, unwrap
from factory.decoders.interpreter import gather_pixel_features
from factory.decoders.keypoints import decode_heatmaps, gaussian_heatmaps
from factory.fingerprint import safetensors_fingerprint
from factory.labels import LabeledSet, load_labeled_set, pixels_sha256

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


class TrainError(RuntimeError):
    """Training could not start or did not finish; the message says why."""


@dataclass
class TrainingData:
    """Native-resolution features and targets of the labeled images, split into train and val."""

    features: list[torch.Tensor]
    targets: torch.Tensor
    """[N, H, W] int64 class ids, or [N, K, H, W] float heatmaps."""
    region: torch.Tensor
    """[N, H, W] int64 strata for pixel sampling: class ids, or near-keypoint (1) vs elsewhere (0)."""
    keypoints: torch.Tensor | None
    train_index: list[int]
    val_index: list[int]
    size: tuple[int, int]


def inputs_hash(cfg: FactoryConfig, labeled_path: str) -> str:
    """What a checkpoint was fitted on; resuming onto different inputs is refused."""
    labeled_sha = safetensors_fingerprint(labeled_path)
    t = cfg.train
    return config_lib.stable_hash(
        {
            "labeled": labeled_sha,
            "backbone": asdict(cfg.backbone),
            "decoder": asdict(cfg.decoder),
            "train": [t.batch_pixels, t.lr, t.class_balanced, t.val_images, t.seed],
        }
    )


def prepare_data(cfg: FactoryConfig, labeled: LabeledSet, backbone, device: torch.device) -> TrainingData:
    """Regenerate the labeled images, check they are the ones that were labeled, keep their features."""
    seeds = labeled.seeds.tolist()
    features: list[list[torch.Tensor]] = []
    for start in range(0, len(seeds), 8):
        out = backbone(seeds[start : start + 8])
        for i, image in enumerate(out.images.numpy()):
            n = start + i
            if pixels_sha256(image) != labeled.image_sha256[n]:
                raise TrainError(
                    f"regenerating {labeled.files[n]} from seed {seeds[n]} gave different pixels than were "
                    "exported for labeling: the backbone weights, psi or code changed since export"
                )
        features.append(out.features)
    maps = [torch.cat(parts) for parts in zip(*features)]
    size = (backbone.resolution, backbone.resolution)
    n_val = cfg.train.val_images
    index = list(range(len(seeds)))
    train_index, val_index = index[: len(index) - n_val], index[len(index) - n_val :]
    if not train_index:
        raise TrainError(f"train.val_images={n_val} leaves no labeled image for training (have {len(seeds)})")
    if labeled.task == "segmentation":
        targets = labeled.masks.long()
        region = targets
        keypoints = None
    else:
        keypoints = labeled.keypoints.float()
        targets = gaussian_heatmaps(keypoints, size, cfg.decoder.heatmap_sigma)
        region = (targets.amax(dim=1) > 0.1).long()
    return TrainingData(maps, targets.to(device), region, keypoints, train_index, val_index, size)


class PixelSampler:
    """Draws (image, y, x) triples from the training images, optionally uniform over strata first."""

    def __init__(self, region: torch.Tensor, train_index: list[int], balanced: bool) -> None:
        self.train_index = torch.tensor(train_index)
        flat = region[self.train_index].reshape(-1)
        self.hw = region.shape[1:]
        self.order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat)
        self.present = torch.nonzero(counts).flatten()
        self.counts = counts[self.present]
        self.starts = (torch.cumsum(counts, 0) - counts)[self.present]
        self.total = flat.numel()
        self.balanced = balanced

    def __call__(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.balanced:
            stratum = torch.randint(len(self.present), (n,), generator=generator)
            offset = (torch.rand(n, generator=generator) * self.counts[stratum]).long()
            flat = self.order[self.starts[stratum] + offset]
        else:
            flat = torch.randint(self.total, (n,), generator=generator)
        h, w = self.hw
        image = self.train_index[flat // (h * w)]
        return image, (flat % (h * w)) // w, flat % w


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A step's pixels depend only on (seed, rank, step), so a resumed run draws what it would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)


def loss_on_pixels(model, data: TrainingData, sampler: PixelSampler, cfg: FactoryConfig, gen) -> torch.Tensor:
    heads, per_head = cfg.decoder.num_heads, cfg.train.batch_pixels
    image, ys, xs = sampler(heads * per_head, gen)
    device = data.features[0].device
    image, ys, xs = image.to(device), ys.to(device), xs.to(device)
    x = gather_pixel_features(data.features, image, ys, xs, data.size)
    out = model(x.view(heads, per_head, -1))  # each head sees its own pixels
    if data.keypoints is None:
        target = data.targets[image, ys, xs].view(heads, per_head)
        return F.cross_entropy(out.flatten(0, 1), target.flatten()) * heads
    target = data.targets[image, :, ys, xs].view(heads, per_head, -1)
    return F.mse_loss(out, target) * heads


@torch.inference_mode()
def evaluate(decoder, data: TrainingData, index: list[int], num_labels: int) -> dict[str, float]:
    """mIoU and pixel accuracy (segmentation) or mean keypoint error in pixels (keypoints)."""
    if not index:
        return {}
    model = unwrap(decoder).eval()
    feats = [f[index] for f in data.features]
    logits = model.forward_maps(feats, data.size)  # [E, B, K, H, W]
    if data.keypoints is None:
        pred = logits.softmax(dim=2).mean(dim=0).argmax(dim=1).cpu()
        return segmentation_metrics(pred, data.targets[index].cpu(), num_labels)
    found = decode_heatmaps(logits.mean(dim=0).cpu())
    truth = data.keypoints[index]
    visible = truth[..., 2] > 0
    err = (found[..., :2] - truth[..., :2]).norm(dim=-1)[visible]
    return {"val_keypoint_error_px": float(err.mean()) if err.numel() else float("nan")}


def segmentation_metrics(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> dict[str, float]:
    conf = torch.bincount(truth.flatten() * num_classes + pred.flatten(), minlength=num_classes**2)
    conf = conf.view(num_classes, num_classes).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter[union > 0] / union[union > 0]
    return {"val_miou": float(iou.mean()), "val_pixel_accuracy": float(inter.sum() / conf.sum())}


def fit(
    cfg: FactoryConfig,
    labeled: LabeledSet,
    device: torch.device,
    rank: int = 0,
    restore: Callable[[torch.nn.Module, torch.optim.Optimizer], int] | None = None,
    report: Callable[[dict, torch.nn.Module, torch.optim.Optimizer, int], None] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """The training loop of one worker, free of Ray so it can be tested directly."""
    backbone = load_backbone(cfg.backbone, device)
    data = prepare_data(cfg, labeled, backbone, device)
    num_labels = len(labeled.label_names)
    model = wrap(build_decoder(cfg.decoder, backbone.feature_channels, num_labels).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step = start_step = restore(model, optimizer) if restore else 0
    sampler = PixelSampler(data.region, data.train_index, cfg.train.class_balanced)
    metrics: dict[str, float] = {}
    loss_sum, loss_count = 0.0, 0
    while True:
        if step == cfg.train.steps or (step and step % cfg.train.checkpoint_every == 0 and loss_count):
            metrics = {"step": step, "start_step": start_step, "loss": loss_sum / max(loss_count, 1)}
            metrics.update(evaluate(model, data, data.val_index, num_labels))
            if report:
                report(metrics, model, optimizer, step)
            loss_sum, loss_count = 0.0, 0
        if step >= cfg.train.steps:
            break
        unwrap(model).train()
        loss = loss_on_pixels(model, data, sampler, cfg, step_generator(cfg.train.seed, rank, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        step += 1
    return unwrap(model), metrics


def _worker(loop_config: dict) -> None:
    """Ray Train entry point on each worker: restore, fit, checkpoint through ray.train.report."""
    import ray.train
    import ray.train.torch

    cfg = config_lib.from_dict(loop_config["cfg"])
    storage.configure(cfg.storage)
    labeled = load_labeled_set(cfg.train.labeled)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    expected_inputs = loop_config["inputs_hash"]

    def restore(model, optimizer) -> int:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
            if state["inputs_hash"] != expected_inputs:
                raise TrainError(
                    f"run {cfg.train.run_name!r} in {cfg.train.storage_path} was fitted on different inputs "
                    "(labeled set, backbone, decoder or train settings); choose a new train.run_name"
                )
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            return int(state["step"])

    def report(metrics, model, optimizer, step) -> None:
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_decoder(
                d, model, cfg.decoder, labeled.label_names, loop_config["in_channels"],
                labeled.backbone_hash, loop_config["config_yaml"],
            )
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "inputs_hash": expected_inputs}
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    fit(cfg, labeled, device, rank, restore, report, wrap=ray.train.torch.prepare_model)


def train(cfg: FactoryConfig) -> dict[str, float]:
    """Fit the decoder described by `cfg` and publish it to `generate.decoder`; returns final metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage.configure(cfg.storage)
    # 1. Check inputs: the labeled set exists and matches the configured task, labels and backbone.
    labeled = load_labeled_set(cfg.train.labeled)
    expected = cfg.label_names()
    if labeled.task != cfg.decoder.task or labeled.label_names != expected:
        raise TrainError(
            f"{cfg.train.labeled} holds {labeled.task} labels {labeled.label_names}, but the config asks for "
            f"decoder.task={cfg.decoder.task!r} with {expected}; re-run `factory annotate import`"
        )
    if len(labeled.files) <= cfg.train.val_images:
        raise TrainError(
            f"{cfg.train.labeled} has {len(labeled.files)} labeled images; train.val_images="
            f"{cfg.train.val_images} would leave none to train on"
        )
    backbone = load_backbone(cfg.backbone)
    if backbone.weights_hash != labeled.backbone_hash:
        raise TrainError(
            f"{cfg.train.labeled} was labeled on backbone {labeled.backbone_hash[:12]}, the config builds "
            f"{backbone.weights_hash[:12]}; check backbone.weights / backbone.init_seed"
        )
    if storage.is_local(cfg.train.storage_path):
        storage_path, storage_fs = storage.local_path(cfg.train.storage_path), None
    else:  # checkpoints on S3 or another fsspec store, through the same endpoint settings
        storage_fs, storage_path = storage.arrow_filesystem(cfg.train.storage_path)
        storage.makedirs(cfg.train.storage_path)

    # 2. Fit on Ray Train.
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "cfg": config_lib.to_dict(cfg),
            "config_yaml": config_lib.to_yaml(cfg),
            "in_channels": backbone.feature_channels,
            "inputs_hash": inputs_hash(cfg, cfg.train.labeled),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainError(f"training in {cfg.train.storage_path}/{cfg.train.run_name} produced no checkpoint")

    # 3. Publish the decoder from the last checkpoint (each file through a temporary name; the
    #    weights last, since readers take a folder without them as "no decoder").
    target = cfg.generate.decoder
    with result.checkpoint.as_directory() as d:
        if storage.is_local(target):
            staging = f"{target}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(d, staging, ignore=shutil.ignore_patterns(STATE_FILE))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        else:
            storage.remove_tree(storage.join(target, MODEL_FILE))
            with tempfile.TemporaryDirectory() as staging:
                shutil.copytree(d, staging, ignore=shutil.ignore_patterns(STATE_FILE), dirs_exist_ok=True)
                storage.upload_tree(staging, target, last=MODEL_FILE)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    log.info("decoder written to %s; final metrics %s", target, metrics)
    return metrics

