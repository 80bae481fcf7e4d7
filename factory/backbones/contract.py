"""The backbone contract: what every backbone returns and reports, whatever generator runs inside."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class BackboneOutput:
    images: torch.Tensor
    """[B, H, W, 3] uint8 on the CPU: exactly the pixels written to PNG. Always RGB: a grayscale
    generator's one channel is repeated three times (`as_rgb`), so everything downstream is unchanged."""
    features: list[torch.Tensor]
    """One [B, C_j, h_j, w_j] map per tap, at native resolution, on the model's device."""
    latents: torch.Tensor
    """[B, z_dim] float32 on the CPU: the z each sample was generated from (the given latents when
    rendered from a user's z or w; [B, 0] for a diffusion backbone, whose starting noise is a
    function of the seed and whose input is the prompt)."""
    classes: list[int] | None = None
    """The class each sample was generated for by a class-conditional generator; None otherwise."""


@dataclass(frozen=True)
class BackboneIdentity:
    weights_hash: str
    """Content hash of the weights as stored (see `factory.fingerprint`)."""
    resolution: int
    feature_names: list[str]
    feature_channels: list[int]


class Backbone(Protocol):
    resolution: int
    feature_channels: list[int]
    feature_names: list[str]
    weights_hash: str

    def __call__(self, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> BackboneOutput: ...

    def accelerate(self, compile: bool = False, channels_last: bool = False) -> None: ...


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] as it is; [B, 1, H, W] (a grayscale generator's) with its channel repeated to RGB."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W], got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [-1, 1] -> [B, H, W, 3] uint8 (clamped, rounded)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().contiguous()
