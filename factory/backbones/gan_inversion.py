"""Projecting real images into a StyleGAN2 generator's W+ (GAN inversion), so a Style Interpreter
fitted on generated images can label real photos and be scored against their ground truth.

The method is the optimisation-based projection of Image2StyleGAN (Abdal et al., 2019) in the
extended latent space W+ (one w per synthesis layer), started from the generator's average w as
StyleGAN2's own projector starts: Adam on W+ against a pixel loss at full and half resolution, with
a small pull towards w_avg, the learning rate cosine-decayed to zero. (W+ can redraw an image
closely with latents the mapping network never produces, so a decoder may read such features less
well than those of the generator's own samples: the quality benchmark measures it.) The per-layer
noise is fixed during the fit (the backbone's noise rule applied to the given seeds), so a
projection is a function of (weights, image, seed, settings, batch) and runs the same on every call;
nothing is decoded by any other model. A grayscale generator's image is repeated to RGB before the
loss, as the backbone shows it, so an RGB target is fitted by the mean of its channels (a gray photo
exactly) and the reconstructions and errors are in the image's RGB terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones.contract import as_rgb
from factory.backbones.stylegan2 import StyleGAN2Generator, num_ws


@dataclass
class Projection:
    w_plus: torch.Tensor
    """[B, num_ws, w_dim] float32: the fitted latents."""
    reconstructions: torch.Tensor
    """[B, 3, H, W] in [-1, 1]: what the generator draws from them (a grayscale one's repeated to RGB)."""
    mse: torch.Tensor
    """[B] mean squared error of each reconstruction against its image, in [-1, 1] units."""


def as_generator_input(images: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """[B, H, W, 3] uint8 (as the backbone returns and the labeled sets hold) -> [B, 3, res, res]
    floats in [-1, 1]; other sizes are resized (bilinear, antialiased)."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"images must be [B, H, W, 3] uint8, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x


def project(generator: StyleGAN2Generator, images: np.ndarray | torch.Tensor, noise: list[torch.Tensor] | None,
            steps: int, lr: float, w_avg_weight: float = 1e-3) -> Projection:
    """Fit one W+ per image (see the module's docstring). `noise` is the generator's per-layer noise
    for the batch (None: no noise). Gradients flow into the latents only; the generator is untouched."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"projection needs steps >= 1 and lr > 0, got {steps} and {lr}")
    with torch.inference_mode(False), torch.enable_grad():  # callable from inside inference code
        return _fit(generator, images, noise, steps, lr, w_avg_weight)


def _fit(generator: StyleGAN2Generator, images, noise, steps: int, lr: float, w_avg_weight: float) -> Projection:
    device = generator.mapping.w_avg.device
    target = as_generator_input(images, generator.cfg.resolution).to(device)
    target_half = F.avg_pool2d(target, 2)
    w_avg = generator.mapping.w_avg.detach().float()
    w_plus = w_avg.reshape(1, 1, -1).repeat(len(target), num_ws(generator.cfg), 1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w_plus], lr=lr, betas=(0.9, 0.999))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        image = as_rgb(generator.synthesize(w_plus, noise=noise)[0])
        loss = (F.mse_loss(image, target, reduction="none").mean(dim=(1, 2, 3))
                + F.mse_loss(F.avg_pool2d(image, 2), target_half, reduction="none").mean(dim=(1, 2, 3))
                + w_avg_weight * (w_plus - w_avg).square().mean(dim=(1, 2)))
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # per-image losses: each latent gets its own image's gradient
        optimizer.step()
    with torch.no_grad():
        w = w_plus.detach()
        image = as_rgb(generator.synthesize(w, noise=noise)[0])
        mse = (image.clamp(-1, 1) - target).square().mean(dim=(1, 2, 3))
    return Projection(w_plus=w, reconstructions=image, mse=mse.cpu())
