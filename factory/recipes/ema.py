"""The exponential moving average of a model's weights that pretraining publishes: the StyleGAN2
generator always (stylegan2-ada's schedule), a diffusion denoiser (UNet or MM-DiT) with
`pretrain.denoiser_ema`.

The half-life is counted in images over all workers (`pretrain.ema_half_life`) and ramped up from 0
as 5% of the images seen so far, so early weights, which are far from the final ones, are forgotten
quickly. Buffers are copied, not averaged."""

from __future__ import annotations

import copy

import torch


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` to average into."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, images_seen: int, batch: int, half_life: float) -> None:
    """One step: ema <- beta ema + (1 - beta) model, beta = 0.5 ** (batch / min(half_life, 0.05 x
    images_seen)); `images_seen` counts this step's batch."""
    beta = 0.5 ** (batch / max(min(half_life, images_seen * 0.05), 1e-8))
    for e, m in zip(ema.parameters(), model.parameters()):
        e.copy_(m.lerp(e, beta))
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)
