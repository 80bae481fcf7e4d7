"""DatasetDM's perception decoder: multi-scale UNet features -> masks, instances, depth, keypoints.

    features (one map per resolution, incl. cross-attention maps)
      -> 1x1 projection per resolution to `dim` channels
      -> top-down fusion (coarse to fine: upsample, add, 3x3 conv) -> mask-feature map
      -> heads: semantic ensemble | instance queries | depth | keypoint heatmaps

- Semantic: every class in one pass, from an ensemble of `num_heads` heads; each head is trained on
  its own random half of the pixels (a bootstrap), and their disagreement (Jensen-Shannon, as in the
  GAN path) is the per-pixel uncertainty.
- Instances: a Mask2Former-style query decoder: learned queries attend to the projected features
  (cross-attention masked by the previous layer's mask prediction, then self-attention and an FFN);
  each query predicts a class (or "no object") and a mask embedding dotted with the mask features.
  Training matches queries to ground-truth instances with the Hungarian algorithm (scipy).
- Depth: log-depth regression with the scale-invariant log loss (SILog).
- Keypoints: Gaussian heatmaps regressed with MSE, decoded with sub-pixel refinement.

Pure PyTorch (and scipy for matching): no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.decoders.keypoints import decode_heatmaps
from factory.decoders.uncertainty import js_uncertainty, top_fraction_mean

TASKS = ("segmentation", "instances", "depth", "keypoints")


class FusedFeatures(nn.Module):
    """1x1 projection per resolution, then top-down fusion to one `dim`-channel map at the finest."""

    def __init__(self, in_channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(min(8, dim), dim)) for c in in_channels
        )
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(min(8, dim), dim), nn.GELU())
            for _ in in_channels
        )

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (mask features at the finest resolution, the projected maps finest first)."""
        projected = [p(f.float()) for p, f in zip(self.project, features)]
        order = sorted(range(len(projected)), key=lambda i: projected[i].shape[-1])  # coarse first
        y = None
        for i in order:
            x = projected[i]
            if y is not None:
                x = x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            y = self.smooth[i](x)
        return y, projected


class QueryLayer(nn.Module):
    """Masked cross-attention to the features, self-attention between queries, FFN (post-norm)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.heads = heads

    def forward(self, q: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn_mask = None
        if mask is not None:  # attend only where the query's current mask is on (Mask2Former)
            blocked = mask.sigmoid().flatten(2) < 0.5  # [B, Q, HW]
            blocked[blocked.all(dim=-1)] = False  # an empty mask attends everywhere
            attn_mask = blocked.repeat_interleave(self.heads, dim=0)
        q = self.norms[0](q + self.cross(q, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0])
        q = self.norms[1](q + self.self_attn(q, q, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


class PerceptionDecoder(nn.Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        tasks: Sequence[str],
        num_classes: int,
        num_keypoints: int = 0,
        dim: int = 64,
        num_heads: int = 5,
        num_queries: int = 16,
        num_layers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"perception tasks must be some of {TASKS}, got {list(tasks)}")
        torch.manual_seed(seed)  # initial weights are a function of the seed
        self.tasks = list(tasks)
        self.num_classes, self.num_keypoints, self.num_queries = num_classes, num_keypoints, num_queries
        self.fuse = FusedFeatures(in_channels, dim)
        if "segmentation" in tasks:
            self.semantic = nn.ModuleList(
                nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, num_classes, 1))
                for _ in range(num_heads)
            )
        if "depth" in tasks:
            self.depth = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, 1, 1))
        if "keypoints" in tasks:
            self.keypoints = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, num_keypoints, 1))
        if "instances" in tasks:
            self.queries = nn.Embedding(num_queries, dim)
            self.query_pos = nn.Embedding(num_queries, dim)
            self.level_embed = nn.Embedding(len(in_channels), dim)
            self.layers = nn.ModuleList(QueryLayer(dim, 4) for _ in range(num_layers))
            self.class_head = nn.Linear(dim, num_classes + 1)  # the last class is "no object"
            self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw outputs at the mask-feature resolution: semantic [E, B, K, h, w] logits, depth
        [B, h, w] log-depth, keypoints [B, K, h, w] heatmaps, instance class logits [B, Q, K+1] and
        mask logits [B, Q, h, w]."""
        mask_features, projected = self.fuse(features)
        out: dict[str, torch.Tensor] = {}
        if "segmentation" in self.tasks:
            out["semantic"] = torch.stack([head(mask_features) for head in self.semantic])
        if "depth" in self.tasks:
            out["depth"] = self.depth(mask_features)[:, 0]
        if "keypoints" in self.tasks:
            out["keypoints"] = self.keypoints(mask_features)
        if "instances" in self.tasks:
            out.update(self._instances(mask_features, projected))
        return out

    def _instances(self, mask_features: torch.Tensor, projected: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        b = mask_features.shape[0]
        q = self.queries.weight.unsqueeze(0).expand(b, -1, -1)
        pos = self.query_pos.weight.unsqueeze(0).expand(b, -1, -1)
        mask = None
        for i, layer in enumerate(self.layers):
            level = i % len(projected)  # round-robin over resolutions, coarsest first
            memory_map = sorted(projected, key=lambda m: m.shape[-1])[level]
            memory = memory_map.flatten(2).transpose(1, 2) + self.level_embed.weight[level]
            if mask is not None:
                mask = F.interpolate(mask, size=memory_map.shape[-2:], mode="bilinear", align_corners=False)
            q = layer(q + pos, memory, torch.zeros_like(memory), mask)
            mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        return {"instance_logits": self.class_head(q), "instance_masks": mask}


# ----------------------------------------------------------------------------------------------
# Losses


def silog_loss(pred_log_depth: torch.Tensor, depth: torch.Tensor, lam: float = 0.85) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al.) over valid pixels (depth > 0)."""
    valid = depth > 0
    if not valid.any():
        return pred_log_depth.sum() * 0
    d = pred_log_depth[valid] - depth[valid].log()
    return torch.sqrt((d**2).mean() - lam * d.mean() ** 2 + 1e-8)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


@torch.no_grad()
def hungarian_match(class_logits: torch.Tensor, mask_logits: torch.Tensor, classes: torch.Tensor,
                    masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (query index, target index) pairs minimising class + mask BCE + dice costs."""
    from scipy.optimize import linear_sum_assignment

    if classes.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    prob = class_logits.softmax(-1)[:, classes]  # [Q, T]
    p = mask_logits.flatten(1)
    t = masks.flatten(1).float()
    pos = F.binary_cross_entropy_with_logits(p, torch.ones_like(p), reduction="none")
    neg = F.binary_cross_entropy_with_logits(p, torch.zeros_like(p), reduction="none")
    bce = (pos @ t.T + neg @ (1 - t).T) / p.shape[1]
    s = p.sigmoid()
    dice = 1 - (2 * s @ t.T + 1) / (s.sum(1, keepdim=True) + t.sum(1)[None] + 1)
    cost = (-prob + 5 * bce + 5 * dice).cpu()
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def instance_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]],
                  no_object_weight: float = 0.1) -> torch.Tensor:
    """targets: per image (classes [T], masks [T, h, w] at the mask-logit resolution)."""
    b, q, k1 = class_logits.shape
    weight = torch.ones(k1, device=class_logits.device)
    weight[-1] = no_object_weight
    total = class_logits.sum() * 0
    for i, (classes, masks) in enumerate(targets):
        rows, cols = hungarian_match(class_logits[i], mask_logits[i], classes, masks)
        target_classes = torch.full((q,), k1 - 1, dtype=torch.long, device=class_logits.device)
        target_classes[rows.to(class_logits.device)] = classes[cols]
        total = total + F.cross_entropy(class_logits[i], target_classes, weight=weight)
        if len(rows):
            pred, true = mask_logits[i][rows], masks[cols].float()
            total = total + 5 * F.binary_cross_entropy_with_logits(pred, true) + 5 * dice_loss(pred, true)
    return total / b


@dataclass
class Targets:
    """What a batch of labeled images provides; any field may be None."""

    masks: torch.Tensor | None = None
    """[B, H, W] int64 class ids."""
    depth: torch.Tensor | None = None
    """[B, H, W] float32 metres, 0 where unknown."""
    heatmaps: torch.Tensor | None = None
    """[B, K, H, W] Gaussian heatmaps."""
    instances: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per image: (classes [T] int64, masks [T, H, W] bool)."""
    class_weights: torch.Tensor | None = None
    """[K] weights of the semantic cross-entropy (e.g. inverse class frequency), else uniform."""


def perception_loss(model: PerceptionDecoder, features: Sequence[torch.Tensor], targets: Targets,
                    head_pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the task losses at full image resolution; `head_pixels` ([E, B, H, W] bool) is each
    semantic head's bootstrap half of the pixels. Returns (loss, per-task values)."""
    out = model(features)
    parts: dict[str, torch.Tensor] = {}

    def up(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    if "semantic" in out and targets.masks is not None:
        size = targets.masks.shape[-2:]
        e, b = out["semantic"].shape[:2]
        logits = up(out["semantic"].flatten(0, 1), size).view(e, b, -1, *size)
        per_pixel = F.cross_entropy(logits.flatten(0, 1), targets.masks.repeat(e, 1, 1), weight=targets.class_weights,
                                    reduction="none").view(e, b, *size)
        weight = head_pixels.float() if head_pixels is not None else torch.ones_like(per_pixel)
        parts["segmentation"] = (per_pixel * weight).sum() / weight.sum().clamp_min(1) * 1.0
    if "depth" in out and targets.depth is not None:
        pred = up(out["depth"][:, None], targets.depth.shape[-2:])[:, 0]
        parts["depth"] = silog_loss(pred, targets.depth)
    if "keypoints" in out and targets.heatmaps is not None:
        pred = up(out["keypoints"], targets.heatmaps.shape[-2:])
        parts["keypoints"] = F.mse_loss(pred, targets.heatmaps) * 100
    if "instance_logits" in out and targets.instances is not None:
        hw = out["instance_masks"].shape[-2:]
        small = [(c, F.interpolate(m[None].float(), size=hw, mode="area")[0] > 0.5 if len(c) else m.new_zeros((0, *hw)))
                 for c, m in targets.instances]
        parts["instances"] = instance_loss(out["instance_logits"], out["instance_masks"], small)
    if not parts:
        raise ValueError(f"no targets for the decoder's tasks {model.tasks}")
    loss = sum(parts.values())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------
# Inference


@dataclass
class PerceptionPrediction:
    masks: torch.Tensor | None
    """[B, H, W] int64 class ids (argmax of the heads' mean probabilities)."""
    pixel_uncertainty: torch.Tensor | None
    """[B, H, W] JS divergence between the semantic heads."""
    score: torch.Tensor
    """[B] mean of the most uncertain pixels (0 without a semantic head)."""
    depth: torch.Tensor | None
    """[B, H, W] float32 metres."""
    keypoints: torch.Tensor | None
    """[B, K, 3] (x, y, score) in pixels."""
    instances: list[list[dict]] | None
    """Per image: [{"id", "class", "score"}], ids counting from 1 in the instance map."""
    instance_map: torch.Tensor | None
    """[B, H, W] int64 instance ids, 0 where no instance."""


@torch.no_grad()
def predict(model: PerceptionDecoder, features: Sequence[torch.Tensor], size: tuple[int, int],
            top_fraction: float = 0.1, instance_threshold: float = 0.5) -> PerceptionPrediction:
    out = model(features)
    b = features[0].shape[0]

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    masks = uncertainty = depth = keypoints = instances = instance_map = None
    score = torch.zeros(b)
    if "semantic" in out:
        e = out["semantic"].shape[0]
        probs = up(out["semantic"].flatten(0, 1)).view(e, b, -1, *size).softmax(dim=2)
        masks = probs.mean(dim=0).argmax(dim=1)
        uncertainty = js_uncertainty(probs, head_dim=0, class_dim=2)
        score = top_fraction_mean(uncertainty, top_fraction)
    if "depth" in out:
        depth = up(out["depth"][:, None])[:, 0].exp()
    if "keypoints" in out:
        keypoints = decode_heatmaps(up(out["keypoints"]))
    if "instance_logits" in out:
        instances, instance_map = _instances(out["instance_logits"], up(out["instance_masks"]), instance_threshold)
    return PerceptionPrediction(masks, uncertainty, score, depth, keypoints, instances, instance_map)


def _instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, threshold: float):
    """Queries whose best real class beats `threshold` become instances, painted in descending score
    so the more confident instance owns a contested pixel."""
    probs = class_logits.softmax(-1)[..., :-1]
    scores, classes = probs.max(-1)
    b, _, h, w = mask_logits.shape
    instance_map = torch.zeros(b, h, w, dtype=torch.long)
    found: list[list[dict]] = []
    for i in range(b):
        keep = torch.nonzero(scores[i] > threshold).flatten()
        keep = keep[scores[i][keep].argsort(descending=True)]
        items = []
        owned = torch.zeros(h, w, dtype=torch.bool)
        for q in keep.tolist():
            region = (mask_logits[i, q].sigmoid() > 0.5).cpu() & ~owned
            if not region.any():
                continue
            items.append({"id": len(items) + 1, "class": int(classes[i, q]), "score": round(float(scores[i, q]), 4)})
            instance_map[i][region] = len(items)
            owned |= region
        found.append(items)
    return found, instance_map
