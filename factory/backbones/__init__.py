"""Backbones: generators that return images *and* the internal feature maps a decoder reads.

Every backbone is called the same way, `backbone(seeds, prompts=None) -> BackboneOutput`, so the
annotation, training and generation recipes never look at which generator runs underneath. Text-driven
backbones (diffusion) take one prompt per seed; StyleGAN2 takes none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from factory.backbones.stylegan2 import StyleGAN2Generator, load_stylegan2
from factory.fingerprint import state_hash

if TYPE_CHECKING:
    from factory.config import BackboneConfig


@dataclass
class BackboneOutput:
    images: torch.Tensor
    """[B, H, W, 3] uint8 on the CPU: exactly the pixels written to PNG."""
    features: list[torch.Tensor]
    """One [B, C_j, h_j, w_j] map per tap, at native resolution, on the model's device."""
    latents: torch.Tensor
    """[B, z_dim] float32 on the CPU: the z each sample was generated from ([B, 0] for a diffusion
    backbone, whose starting noise is a function of the seed and whose input is the prompt)."""


class Backbone(Protocol):
    resolution: int
    feature_channels: list[int]
    feature_names: list[str]
    weights_hash: str

    def __call__(self, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> BackboneOutput: ...


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [-1, 1] -> [B, H, W, 3] uint8 (clamped, rounded)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().contiguous()


class StyleGAN2Backbone:
    """A StyleGAN2 generator sampled at a fixed truncation: a sample is a function of its seed."""

    def __init__(self, cfg: BackboneConfig, device: str | torch.device = "cpu") -> None:
        if cfg.weights is None:
            generator = StyleGAN2Generator(cfg.stylegan2, seed=cfg.init_seed)
        else:
            generator = load_stylegan2(cfg.weights)
        self.generator = generator.eval().requires_grad_(False).to(device)
        self.psi = cfg.psi
        self.rgb_taps = cfg.rgb_taps
        self.batch_invariant = cfg.batch_invariant
        info = self.generator.feature_info(rgb_taps=cfg.rgb_taps)
        self.feature_names = [name for name, _, _ in info]
        self.feature_channels = [channels for _, channels, _ in info]
        self.resolution = self.generator.cfg.resolution
        self.weights_hash = state_hash(self.generator)

    @torch.no_grad()  # not inference_mode: training backpropagates through decoders fed these features
    def __call__(self, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> BackboneOutput:
        if prompts is not None:
            raise ValueError("a StyleGAN2 backbone takes no prompts (backbone.kind is 'stylegan2')")
        # Batched convolutions differ from unbatched ones in the last float bits, enough to flip a
        # uint8 pixel; one seed per forward pass makes a sample a function of its seed alone.
        groups = [[s] for s in seeds] if self.batch_invariant else [list(seeds)]
        parts = [self.generator.sample(group, psi=self.psi, rgb_taps=self.rgb_taps) for group in groups]
        z = torch.cat([p[0] for p in parts])
        images = torch.cat([p[1] for p in parts])
        features = {name: torch.cat([p[2][name] for p in parts]) for name in self.feature_names}
        return BackboneOutput(
            images=to_uint8(images),
            features=[features[name] for name in self.feature_names],
            latents=z.detach().float().cpu(),
        )


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    if cfg.kind == "stylegan2":
        return StyleGAN2Backbone(cfg, device)
    if cfg.kind == "diffusion":
        from factory.backbones.diffusion import DiffusionBackbone  # imports diffusers + transformers

        return DiffusionBackbone(cfg, device)
    raise ValueError(f"backbone.kind must be 'stylegan2' or 'diffusion', got {cfg.kind!r}")
