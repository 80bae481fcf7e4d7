"""Backbones: generators that return images *and* the internal feature maps a decoder reads.

Every backbone is called the same way, `backbone(seeds, prompts=None) -> BackboneOutput`, so the
annotation, training and generation recipes never look at which generator runs underneath. Text-driven
backbones (diffusion) take one prompt per seed; StyleGAN2 takes none.

`backbone_identity(cfg)` tells what a backbone is (weights hash, resolution, feature layout) from its
weight files and config without building it, so a driver can check a decoder against the backbone
and plan a build without loading a multi-GB model; a built backbone reports the same identity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from factory.backbones.contract import Backbone, BackboneIdentity, BackboneOutput, to_uint8
from factory.backbones.gan import StyleGAN2Backbone, stylegan2_identity

if TYPE_CHECKING:
    from factory.config import BackboneConfig

__all__ = ["Backbone", "BackboneIdentity", "BackboneOutput", "StyleGAN2Backbone", "backbone_identity",
           "load_backbone", "to_uint8"]


def backbone_identity(cfg: BackboneConfig) -> BackboneIdentity:
    """What `load_backbone(cfg)` would report (weights hash, resolution, features), without building it."""
    if cfg.kind == "stylegan2":
        return stylegan2_identity(cfg)
    if cfg.kind == "diffusion":
        from factory.backbones.diffusion import identity  # imports diffusers + transformers

        return identity(cfg)
    raise ValueError(f"backbone.kind must be 'stylegan2' or 'diffusion', got {cfg.kind!r}")


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    if cfg.kind == "stylegan2":
        return StyleGAN2Backbone(cfg, device)
    if cfg.kind == "diffusion":
        from factory.backbones.diffusion import DiffusionBackbone  # imports diffusers + transformers

        return DiffusionBackbone(cfg, device)
    raise ValueError(f"backbone.kind must be 'stylegan2' or 'diffusion', got {cfg.kind!r}")
