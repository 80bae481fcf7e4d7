"""A small segmentation network trained on (image, mask) pairs, and per-class IoU.

Two jobs in the project use it, both from issue 6's evaluation protocol: the *downstream* model of
`benchmarks/quality.py` (trained on real labeled images, on the factory's synthetic samples, or on
both, and scored on held-out real images, as the papers evaluate their datasets), and the GAN-path
demo's stand-in annotator (trained on plentiful toy-world ground truth and used only to label the 16
generated images the Style Interpreter learns from, never in evaluation).

The network is a four-level U-Net (GroupNorm + SiLU, skip connections), about 0.5 M parameters at
the default width, fast enough to train on 2 CPU cores in minutes at 64 px.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from factory import tensorfile

FORMAT = "factory.segmenter"


@dataclass
class SegmenterConfig:
    num_classes: int
    width: int = 32
    """Channels of the first level; each level below doubles them (capped at 4x)."""
    levels: int = 3
    """Downsampling steps (the input size must be a multiple of 2**levels)."""

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.width < 8 or self.width % 8 or self.levels < 1:
            raise ValueError(f"segmenter: num_classes must be >= 2, width a multiple of 8, levels >= 1; got "
                             f"num_classes={self.num_classes}, width={self.width}, levels={self.levels}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
    )


class Segmenter(nn.Module):
    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.width * min(2**i, 4) for i in range(cfg.levels + 1)]
        self.stem = _block(3, widths[0])
        self.down = nn.ModuleList(_block(a, b) for a, b in zip(widths, widths[1:]))
        self.up = nn.ModuleList(_block(b + a, a) for a, b in zip(widths, widths[1:]))
        self.head = nn.Conv2d(widths[0], cfg.num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] or float [B, 3, H, W] in [-1, 1] -> logits [B, C, H, W]."""
        x = normalize(images) if images.dtype == torch.uint8 else images
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.avg_pool2d(skips[-1], 2)))
        x = skips.pop()
        for block in reversed(self.up):
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.head(x)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1)


@dataclass
class FitConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    flip: bool = True
    """Random horizontal flips (the labels must not tell left from right)."""


def fit(
    images: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    cfg: SegmenterConfig,
    fit_cfg: FitConfig = FitConfig(),
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Segmenter:
    """Train a segmenter on uint8 images [N, H, W, 3] and class-id masks [N, H, W]; a function of
    (data, configs) on a given device. Cross-entropy, AdamW, cosine learning rate."""
    model = None
    for _, model in _training(images, masks, cfg, fit_cfg, device, progress, every=fit_cfg.steps):
        pass
    return model.eval()


def fit_selected(
    images: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    val_images: np.ndarray,
    val_masks: np.ndarray,
    cfg: SegmenterConfig,
    fit_cfg: FitConfig | None = None,
    every: int = 100,
    device: str | torch.device = "cpu",
) -> tuple[Segmenter, dict]:
    """`fit`, scored on a validation set every `every` steps (and at the end); returns the state with
    the best validation mIoU and {"step", "val_miou", "curve": [[step, val_miou], ...]}. The papers'
    rule for a fair comparison between training sets of very different sizes: each run stops where
    held-apart real images say it is best, not after a step count that is many epochs of a small set
    and a fraction of one of a large set. The validation images never enter training."""
    if every < 1:
        raise ValueError(f"every must be >= 1 step, got {every}")
    fit_cfg = fit_cfg or FitConfig()
    best: tuple[float, int, dict] | None = None
    curve = []
    model = None
    for step, model in _training(images, masks, cfg, fit_cfg, device, False, every):
        model.eval()
        score = mean_iou(iou_per_class(predict(model, val_images), val_masks, cfg.num_classes))
        curve.append([step, score])
        if best is None or score > best[0]:
            best = (score, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        model.train()
    model.load_state_dict(best[2])
    return model.eval(), {"step": best[1], "val_miou": best[0], "curve": curve}


def _training(images, masks, cfg: SegmenterConfig, fit_cfg: FitConfig, device, progress: bool, every: int):
    """The training loop; yields (step, model) every `every` steps and after the last one."""
    images, masks = torch.as_tensor(np.asarray(images)), torch.as_tensor(np.asarray(masks)).long()
    if images.ndim != 4 or images.shape[:3] != masks.shape or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] and masks [N, H, W]; got {tuple(images.shape)} and "
                         f"{tuple(masks.shape)}")
    if int(masks.max()) >= cfg.num_classes:
        raise ValueError(f"mask value {int(masks.max())} >= num_classes={cfg.num_classes}")
    gen = torch.Generator().manual_seed(fit_cfg.seed)
    torch.manual_seed(fit_cfg.seed)
    # channels-last: mkldnn's convolutions run about a quarter faster on it on CPU (forward and
    # backward); the weights are the same numbers, stored in another order.
    model = Segmenter(cfg).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=fit_cfg.lr, weight_decay=fit_cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, fit_cfg.steps) / fit_cfg.steps)))
    steps = range(fit_cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="segmenter", leave=False)
    model.train()
    for step in steps:
        idx = torch.randint(len(images), (min(fit_cfg.batch_size, len(images)),), generator=gen)
        x, y = normalize(images[idx]), masks[idx]
        if fit_cfg.flip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = F.cross_entropy(model(x.to(device).contiguous(memory_format=torch.channels_last)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % every == 0 or step + 1 == fit_cfg.steps:
            yield step + 1, model


@torch.no_grad()
def predict(model: Segmenter, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> uint8 class ids [N, H, W]."""
    images = torch.as_tensor(np.asarray(images))
    device = next(model.parameters()).device
    out = [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.uint8)


def iou_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float | None]:
    """IoU of every class over a whole evaluation set (None for a class absent from both)."""
    conf = np.bincount(truth.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel(),
                       minlength=num_classes**2).reshape(num_classes, num_classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return [float(i / u) if u else None for i, u in zip(inter, union)]


def mean_iou(per_class: list[float | None]) -> float:
    present = [v for v in per_class if v is not None]
    return float(np.mean(present)) if present else float("nan")


def chance_iou(truth: np.ndarray, num_classes: int) -> list[float | None]:
    """Expected IoU per class of a guesser that draws each pixel's class from the class
    frequencies: for class frequency p, E[intersection] = p^2 and E[union] = 2p - p^2."""
    p = np.bincount(truth.astype(np.int64).ravel(), minlength=num_classes) / truth.size
    return [float(q / (2 - q)) if q else None for q in p]


def save(model: Segmenter, path: str, classes: list[str]) -> None:
    tensorfile.write(path, model.state_dict(), FORMAT, {"config": json.dumps(asdict(model.cfg)),
                                                         "classes": json.dumps(classes)})


def load(path: str, device: str | torch.device = "cpu") -> tuple[Segmenter, list[str]]:
    state, meta = tensorfile.read(path, FORMAT, "factory segmenter")
    model = Segmenter(SegmenterConfig(**json.loads(meta["config"])))
    model.load_state_dict(state)
    return model.to(device).eval(), json.loads(meta["classes"])


@torch.no_grad()
def embed(model: Segmenter, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> [N, D] float64: the encoder's every level, average-pooled and
    concatenated. With fixed weights (the shipped stand-in annotator's) it is a fixed feature extractor
    for distances between image sets (`benchmarks/quality.py`'s KID), as Inception is for photos."""
    images = torch.as_tensor(np.asarray(images))
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size].to(device))
        levels = [model.stem(x)]
        for block in model.down:
            levels.append(block(F.avg_pool2d(levels[-1], 2)))
        out.append(torch.cat([level.mean((2, 3)) for level in levels], 1).double().cpu())
    return torch.cat(out).numpy()
