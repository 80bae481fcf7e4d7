"""StyleGAN2 as a backbone: a generator from a weights file (or seeded random weights) sampled at a
fixed truncation, so a sample is a function of its seed; every conv layer's output is a feature."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from factory import fingerprint
from factory.backbones.contract import BackboneIdentity, BackboneOutput, to_uint8
from factory.backbones.stylegan2 import StyleGAN2Generator, feature_info, load_stylegan2, read_architecture

if TYPE_CHECKING:
    from factory.config import BackboneConfig


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
        self.identity = stylegan2_identity(cfg, self.generator)
        self.feature_names, self.feature_channels = self.identity.feature_names, self.identity.feature_channels
        self.resolution = self.identity.resolution
        self.weights_hash = self.identity.weights_hash

    def accelerate(self, compile: bool = False, channels_last: bool = False) -> None:
        """Opt-in speed-ups for long builds: channels-last memory format, `torch.compile` of the
        mapping and synthesis networks (the first batch then pays the compile time)."""
        if channels_last:
            self.generator.to(memory_format=torch.channels_last)
        if compile:
            self.generator.mapping = torch.compile(self.generator.mapping)
            self.generator.synthesis = torch.compile(self.generator.synthesis)

    @torch.no_grad()  # not inference_mode: training backpropagates through decoders fed these features
    def __call__(self, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> BackboneOutput:
        if prompts is not None:
            raise ValueError("a StyleGAN2 backbone takes no prompts (backbone.kind is 'stylegan2')")
        # Batched convolutions differ from unbatched ones in the last float bits, enough to flip a
        # uint8 pixel: a sample is a function of its seed and its batch, or with batch_invariant
        # (one seed per forward pass) of its seed alone.
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


def stylegan2_identity(cfg: BackboneConfig, generator: StyleGAN2Generator | None = None) -> BackboneIdentity:
    """A weights file's identity from its tensors and stored architecture (hash cached beside it); the
    random-weight default's from `generator` or a fresh build of it (they are tiny)."""
    if cfg.weights is None:
        generator = generator or StyleGAN2Generator(cfg.stylegan2, seed=cfg.init_seed)
        arch, weights_hash = generator.cfg, fingerprint.state_hash(generator)
    else:
        arch = read_architecture(cfg.weights)
        folder, name = os.path.split(os.path.abspath(cfg.weights))
        weights_hash = fingerprint.cached_hash(
            [cfg.weights], folder, f".{name}{fingerprint.CACHE_FILE}",
            lambda: fingerprint.safetensors_fingerprint(cfg.weights, with_metadata=False))
    info = feature_info(arch, cfg.rgb_taps)
    return BackboneIdentity(weights_hash, arch.resolution, [n for n, _, _ in info], [c for _, c, _ in info])
