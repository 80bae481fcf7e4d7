"""What training optimises, per decoder kind: the training data a decoder sees, its loss on one
step's batch, and its validation metrics. `factory.recipes.train` runs any of them the same way.

- `InterpreterObjective` (GAN path): the labeled images are regenerated from their seeds and checked
  against the exported pixels; features stay at native resolution; each step samples pixels
  (class-balanced by default) and gathers their feature vectors.
- `PerceptionObjective` (diffusion path): the labeled real images are inverted through the backbone
  once (`backbone.invert`); each step takes a few whole images and sums the task losses. Each
  semantic head learns from its own fixed random half of every image's pixels (a bootstrap), which
  keeps the ensemble's disagreement honest.

Free of Ray, so every piece is tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from factory.config import FactoryConfig
from factory.data.annotations import LabeledSet, pixels_sha256
from factory.data.labeled_photos import RealLabeledSet, views
from factory.decoders import build_decoder, unwrap
from factory.decoders.interpreter import (
    feature_stats,
    gather_pixel_features,
    prior_offset,
)
from factory.decoders.keypoints import decode_heatmaps, gaussian_heatmaps
from factory.decoders.perception import Targets, perception_loss, predict
from factory.recipes.ray_train import TrainError


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


def _within_float_noise(image: np.ndarray, labeled: LabeledSet, n: int) -> bool:
    """Regenerated pixels that differ from the exported ones only as another thread count's float
    rounding does: a few pixels off by at most 2 grey levels."""
    if labeled.images is None or tuple(labeled.images[n].shape) != image.shape:
        return False
    diff = np.abs(image.astype(np.int16) - labeled.images[n].numpy().astype(np.int16))
    return int(diff.max()) <= 2 and float((diff > 0).mean()) < 0.02


def regenerate(labeled: LabeledSet, backbone) -> list[torch.Tensor]:
    """The labeled images' features, generated again from what they were exported from (their seeds,
    or the user's own latents, `annotate.latents`, with the seeds' noise and classes), each in the
    batch it was exported in, and checked against the exported pixels; one [N, C_j, h_j, w_j] map per
    tap, in the labeled set's order."""
    position = {seed: n for n, seed in enumerate(labeled.seeds.tolist())}
    rows: dict[int, list[torch.Tensor]] = {}
    for batch in labeled.batches_to_regenerate():
        if labeled.latents is None:
            out = backbone(batch)
        else:
            out = backbone.render(labeled.latents_of(batch), labeled.latent_space, batch)
        for i, seed in enumerate(batch):
            n = position.get(seed)
            if n is None:
                continue  # exported with the labeled ones, skipped by the annotators
            image = out.images[i].numpy()
            if pixels_sha256(image) != labeled.image_sha256[n] and not _within_float_noise(image, labeled, n):
                raise TrainError(
                    f"regenerating {labeled.files[n]} from seed {seed} gave different pixels than were "
                    "exported for labeling: the backbone weights, psi or code changed since export"
                )
            rows[n] = [f[i : i + 1] for f in out.features]
    return [torch.cat(parts) for parts in zip(*(rows[n] for n in range(len(position))))]


def prepare_data(cfg: FactoryConfig, labeled: LabeledSet, backbone, device: torch.device) -> TrainingData:
    """Regenerate the labeled images, check they are the ones that were labeled, keep their features."""
    seeds = labeled.seeds.tolist()
    maps = regenerate(labeled, backbone)
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


def build_interpreter(cfg: FactoryConfig, in_channels: list[int], num_labels: int,
                      data: TrainingData) -> torch.nn.Module:
    """A fresh Style Interpreter for these training data, fixed before the first step: with
    `decoder.standardize`, its input statistics are the training images' (`feature_stats`); when
    training draws segmentation pixels evenly over the classes (`train.class_balanced`) and
    `decoder.prior_correction` > 0, its inference logits are shifted by that power of the training
    labels' class frequencies (`prior_offset`)."""
    model = build_decoder(cfg.decoder, in_channels, num_labels)
    if cfg.decoder.standardize:
        model.standardize(*feature_stats(data.features, data.train_index))
    if data.keypoints is None and cfg.train.class_balanced and cfg.decoder.prior_correction > 0:
        counts = torch.bincount(data.targets[data.train_index].flatten().cpu(), minlength=num_labels)
        model.offset_logits(prior_offset(counts, cfg.decoder.prior_correction))
    return model


class InterpreterObjective:
    """The Style Interpreter on regenerated, annotated GAN images (pixel batches)."""

    def __init__(self, cfg: FactoryConfig, labeled: LabeledSet, backbone, device: torch.device) -> None:
        self.cfg = cfg
        self.data = prepare_data(cfg, labeled, backbone, device)
        self.sampler = PixelSampler(self.data.region, self.data.train_index, cfg.train.class_balanced)
        self.num_labels = len(labeled.label_names)

    def build(self, in_channels: list[int]) -> torch.nn.Module:
        return build_interpreter(self.cfg, in_channels, self.num_labels, self.data)

    def loss(self, model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
        return loss_on_pixels(model, self.data, self.sampler, self.cfg, gen)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, self.data, self.data.val_index, self.num_labels)


class PerceptionObjective:
    """The perception decoder on inverted real images (whole-image batches, all tasks at once)."""

    def __init__(self, cfg: FactoryConfig, labeled: RealLabeledSet, backbone, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        n, n_val = len(labeled.files), cfg.train.val_images
        if n_val >= n:
            raise TrainError(f"train.val_images={n_val} leaves no labeled image for training (have {n})")
        # Every labeled image once as it is (the last n_val validate), then the training images'
        # extra views: mirrored (train.flip) and further noise draws (train.inversion_draws).
        extra = [(i, mirrored, draw) for mirrored in ((False, True) if cfg.train.flip else (False,))
                 for draw in range(cfg.train.inversion_draws) for i in range(n - n_val) if mirrored or draw]
        rows = [(i, False, 0) for i in range(n)] + extra
        self.labeled = labeled = views(labeled, [(i, mirrored) for i, mirrored, _ in rows])
        # The inversion noise of each row: an image's first draw keeps the seed it always had.
        seeds = [cfg.train.seed * 1_000_003 + i + n * (2 * draw + mirrored) for i, mirrored, draw in rows]
        starts = [*range(0, n, 8), *range(n, len(rows), 8)]  # the originals in the batches they always had
        parts = [backbone.invert(labeled.images[i : j].numpy(), labeled.prompts[i : j], seeds[i : j])
                 for i, j in zip(starts, [*starts[1:], len(rows)])]
        self.features = [torch.cat(group) for group in zip(*parts)]
        self.train_index = [k for k, (i, _, _) in enumerate(rows) if i < n - n_val]
        self.val_index = list(range(n - n_val, n))
        self.size = tuple(labeled.images.shape[1:3])
        tasks = cfg.decoder.tasks
        self.masks = labeled.masks.long().to(device) if "segmentation" in tasks else None
        self.class_weights = None
        if self.masks is not None and cfg.train.class_balanced:
            self.class_weights = class_weights(self.masks[self.train_index], len(labeled.classes))
        self.depth = labeled.depth.to(device) if "depth" in tasks else None
        self.heatmaps = (gaussian_heatmaps(labeled.keypoints, self.size, cfg.decoder.heatmap_sigma).to(device)
                         if "keypoints" in tasks else None)

    def build(self, in_channels: list[int]) -> torch.nn.Module:
        return build_decoder(self.cfg.decoder, in_channels, len(self.labeled.classes), len(self.labeled.keypoint_names))

    def targets(self, index: list[int]) -> Targets:
        instances = None
        if "instances" in self.cfg.decoder.tasks:
            instances = []
            for i in index:
                imap = self.labeled.instance_map[i].to(self.device)
                ids = [j for j in range(1, len(self.labeled.instance_classes[i]) + 1)]
                classes = torch.tensor(self.labeled.instance_classes[i], dtype=torch.long, device=self.device)
                masks = torch.stack([imap == j for j in ids]) if ids else torch.zeros(0, *self.size, dtype=torch.bool,
                                                                                     device=self.device)
                present = masks.flatten(1).any(1)  # an instance the crop removed is not a target
                instances.append((classes[present], masks[present]))
        pick = torch.tensor(index, device=self.device)
        return Targets(
            masks=self.masks[pick] if self.masks is not None else None,
            depth=self.depth[pick] if self.depth is not None else None,
            heatmaps=self.heatmaps[pick] if self.heatmaps is not None else None,
            instances=instances,
            class_weights=self.class_weights,
        )

    def loss(self, model: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
        batch = [self.train_index[int(i)] for i in torch.randint(len(self.train_index), (self.cfg.train.batch_images,),
                                                                 generator=gen)]
        features = [f[batch] for f in self.features]
        head_pixels = None
        if "segmentation" in self.cfg.decoder.tasks:
            head_pixels = torch.stack([
                torch.stack([bootstrap_half(self.cfg.decoder.init_seed, head, i, self.size) for i in batch])
                for head in range(self.cfg.decoder.num_heads)
            ]).to(self.device)
        loss, _ = perception_loss(model, features, self.targets(batch), head_pixels)
        return loss

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.val_index:
            return {}
        model = unwrap(model).eval()
        index = self.val_index
        p = predict(model, [f[index] for f in self.features], self.size, self.cfg.decoder.uncertainty_top_fraction,
                    self.cfg.decoder.instance_threshold)
        t = self.targets(index)
        metrics: dict[str, float] = {}
        if p.masks is not None:
            metrics.update(segmentation_metrics(p.masks.cpu(), t.masks.cpu(), len(self.labeled.classes)))
        if p.depth is not None:
            metrics.update(depth_metrics(p.depth.cpu(), t.depth.cpu()))
        if p.instance_map is not None:
            metrics["val_instance_iou"] = instance_iou(p.instance_map.cpu(), t.instances)
        if p.keypoints is not None:
            truth = self.labeled.keypoints[index]
            visible = truth[..., 2] > 0
            err = (p.keypoints[..., :2].cpu() - truth[..., :2]).norm(dim=-1)[visible]
            metrics["val_keypoint_error_px"] = float(err.mean()) if err.numel() else float("nan")
        return metrics


def class_weights(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights of the semantic cross-entropy, so rare classes count as much as
    common ones: mean 1 over the classes present, 0 for the absent."""
    counts = torch.bincount(masks.flatten(), minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
    return weights / weights[counts > 0].mean()


def bootstrap_half(seed: int, head: int, image: int, size: tuple[int, int]) -> torch.Tensor:
    """The fixed random half of an image's pixels that one semantic head learns from."""
    gen = torch.Generator().manual_seed(seed * 7_919 + head * 104_729 + image)
    return torch.rand(size, generator=gen) < 0.5


def depth_metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Absolute relative error and the share of pixels within 25% (delta < 1.25), on known depth."""
    valid = truth > 0
    p, t = pred[valid], truth[valid]
    ratio = torch.maximum(p / t, t / p)
    return {"val_depth_abs_rel": float(((p - t).abs() / t).mean()), "val_depth_delta1": float((ratio < 1.25).float().mean())}


def instance_iou(pred_map: torch.Tensor, truth: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over true instances of the best IoU any predicted instance reaches with it."""
    ious = []
    for b, (_, masks) in enumerate(truth):
        ids = [int(i) for i in pred_map[b].unique() if i > 0]
        for m in masks.cpu():
            best = 0.0
            for i in ids:
                p = pred_map[b] == i
                best = max(best, float((p & m).sum() / (p | m).sum()))
            ious.append(best)
    return float(sum(ious) / len(ious)) if ious else float("nan")


def objective_for(cfg: FactoryConfig, labeled, backbone, device: torch.device):
    """The objective of `decoder.kind`, with its training data prepared."""
    if cfg.decoder.kind == "perception":
        return PerceptionObjective(cfg, labeled, backbone, device)
    return InterpreterObjective(cfg, labeled, backbone, device)
