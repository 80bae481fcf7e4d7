"""StyleGAN2 as a backbone: a generator from a weights file in any supported format (or seeded random
weights) sampled at a fixed truncation, noise mode and class rule, so a sample is a function of its
seed; every conv layer's output is a feature (of the blocks `backbone.feature_resolutions` selects).
Its images are RGB: a grayscale generator's (img_channels=1) gray channel is repeated three times
(its `rgb_taps` features keep the one channel). Real images are inverted by projection into W+."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from factory import fingerprint, storage
from factory.backbones.checkpoint import IMG_CHANNELS, check_img_channels
from factory.backbones.contract import BackboneIdentity, BackboneOutput, as_rgb, to_uint8
from factory.backbones.gan_inversion import project
from factory.backbones.stylegan2 import StyleGAN2Generator, feature_info
from factory.backbones.stylegan2_formats import identity_hash, load_generator, weights_info
from factory.config import ConfigError, StyleGAN2Config

if TYPE_CHECKING:
    from factory.config import BackboneConfig

log = logging.getLogger(__name__)


def local_weights(cfg: BackboneConfig) -> str:
    """`backbone.weights` as a local file: fetched once into the local cache when it is a storage URL."""
    return storage.fetch(cfg.weights)


def classes_for(cfg: BackboneConfig, seeds: Sequence[int]) -> list[int] | None:
    """The class of each seed for a class-conditional generator: classes[seed % len(classes)], so the
    class depends on the seed alone (None when `backbone.classes` is empty)."""
    if not cfg.classes:
        return None
    return [cfg.classes[int(s) % len(cfg.classes)] for s in seeds]


def check_settings(cfg: BackboneConfig, arch: StyleGAN2Config, noise_const: bool, where: str) -> None:
    """`backbone.classes`, `backbone.noise` and `backbone.feature_resolutions` against what the generator
    has; ConfigError naming the key. Also img_channels: 1 or 3 (a file's as its reader refuses it)."""
    if cfg.weights is None and arch.img_channels not in IMG_CHANNELS:
        raise ConfigError(f"backbone.stylegan2.img_channels must be 1 (grayscale, shown as RGB) or 3 (RGB), "
                          f"got {arch.img_channels}")
    check_img_channels(arch, where)  # a file's, also when its identity was cached before this check
    if arch.c_dim > 0 and not cfg.classes:
        raise ConfigError(f"backbone.classes must list the class indices to generate: {where} is class-conditional "
                          f"(c_dim={arch.c_dim}); e.g. backbone.classes=[3] or backbone.classes=[0,1,2]")
    if arch.c_dim == 0 and cfg.classes:
        raise ConfigError(f"backbone.classes={list(cfg.classes)} but {where} is unconditional (c_dim=0); leave it empty")
    bad = [c for c in cfg.classes if c >= arch.c_dim]
    if arch.c_dim and bad:
        raise ConfigError(f"backbone.classes has {bad[0]}, outside {where}'s {arch.c_dim} classes (c_dim={arch.c_dim})")
    missing = [r for r in cfg.feature_resolutions if r not in arch.block_resolutions]
    if missing:
        raise ConfigError(f"backbone.feature_resolutions has {missing[0]}, not a block of {where} (its blocks: "
                          f"{', '.join(map(str, arch.block_resolutions))})")
    if cfg.noise == "const" and not noise_const:
        raise ConfigError(f"backbone.noise=const needs the checkpoint's noise_const buffers, and {where} has none "
                          f"(official pickles and rosinality checkpoints store them); use backbone.noise=seed")


class StyleGAN2Backbone:
    """A StyleGAN2 generator sampled at a fixed truncation: a sample is a function of its seed."""

    def __init__(self, cfg: BackboneConfig, device: str | torch.device = "cpu") -> None:
        if cfg.weights is None:
            generator, where = StyleGAN2Generator(cfg.stylegan2, seed=cfg.init_seed), "the random-weight generator"
        else:
            generator, where = load_generator(local_weights(cfg)), cfg.weights
        check_settings(cfg, generator.cfg, generator.has_noise_const, where)
        self.generator = generator.eval().requires_grad_(False).to(device)
        if torch.device(device).type == "cuda" and cfg.dtype != "float32" and generator.cfg.num_fp16_res:
            self.generator.synthesis.reduced_dtype = getattr(torch, cfg.dtype)
        self.cfg = cfg
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

    def _groups(self, seeds: Sequence[int]) -> list[list[int]]:
        # Batched convolutions differ from unbatched ones in the last float bits, enough to flip a
        # uint8 pixel: a sample is a function of its seed and its batch, or with batch_invariant
        # (one seed per forward pass) of its seed alone.
        return [[s] for s in seeds] if self.batch_invariant else [list(seeds)]

    def _output(self, parts: list[tuple[torch.Tensor, torch.Tensor, dict]], seeds: Sequence[int]) -> BackboneOutput:
        features = {name: torch.cat([p[2][name] for p in parts]) for name in self.feature_names}
        return BackboneOutput(
            images=to_uint8(as_rgb(torch.cat([p[1] for p in parts]))),
            features=[features[name] for name in self.feature_names],
            latents=torch.cat([p[0] for p in parts]).detach().float().cpu(),
            classes=classes_for(self.cfg, seeds),
        )

    @torch.no_grad()  # not inference_mode: training backpropagates through decoders fed these features
    def __call__(self, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> BackboneOutput:
        if prompts is not None:
            raise ValueError("a StyleGAN2 backbone takes no prompts (backbone.kind is 'stylegan2')")
        parts = [self.generator.sample(group, psi=self.psi, rgb_taps=self.rgb_taps, noise_mode=self.cfg.noise,
                                       classes=classes_for(self.cfg, group))
                 for group in self._groups(seeds)]
        return self._output(parts, seeds)

    @torch.no_grad()
    def render(self, latents: torch.Tensor, space: str, seeds: Sequence[int]) -> BackboneOutput:
        """Images from given latents instead of the seeds' z: "z" is mapped and truncated with
        `backbone.psi` like a seed's z, "w" goes straight to synthesis. The seeds give each image its
        noise (`backbone.noise: seed`) and class, as they would for their own z."""
        if space not in ("z", "w"):
            raise ValueError(f"latent space must be 'z' or 'w', got {space!r}")
        if len(latents) != len(seeds):
            raise ValueError(f"{len(latents)} latents for {len(seeds)} seeds")
        device = self.generator.mapping.w_avg.device
        parts, start = [], 0
        for group in self._groups(seeds):
            given = latents[start : start + len(group)].float().to(device)
            start += len(group)
            _, noise, c = self.generator.inputs(group, self.cfg.noise, classes_for(self.cfg, group))
            if space == "z":
                image, feats = self.generator(given, psi=self.psi, noise=noise, rgb_taps=self.rgb_taps, c=c)
            else:
                image, feats = self.generator.synthesize(given, noise=noise, rgb_taps=self.rgb_taps)
            parts.append((given, image, feats))
        return self._output(parts, seeds)

    def invert(self, images: np.ndarray | torch.Tensor, prompts: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Real images [B, H, W, 3] uint8 -> the features the generator draws them with: each image
        projected into W+ (`gan_inversion.project`, a grayscale generator's image compared as RGB,
        `backbone.inversion_steps` at
        `backbone.inversion_lr`), then synthesised once more with the taps on. `seeds` give each
        image its layer noise by `backbone.noise`, as for a generated sample (default 0, 1, ...);
        the images are one batch, so a projection is a function of its image, seed and batch."""
        if prompts is not None and any(prompts):
            raise ValueError("a StyleGAN2 backbone takes no prompts (backbone.kind is 'stylegan2')")
        seeds = list(range(len(images))) if seeds is None else list(seeds)
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images for {len(seeds)} seeds")
        with torch.inference_mode(False):
            _, noise, _ = self.generator.inputs(seeds, self.cfg.noise, classes_for(self.cfg, seeds))
            fit = project(self.generator, images, noise, self.cfg.inversion_steps, self.cfg.inversion_lr)
            report_fit(fit.mse)
            with torch.no_grad():
                _, feats = self.generator.synthesize(fit.w_plus, noise=noise, rgb_taps=self.rgb_taps)
        return [feats[name] for name in self.feature_names]


POOR_FIT_PSNR = 15.0
"""dB under which a projection is called poor: the toy faces redraw at about 22 dB, the generator's
own images at 33 dB, random noise at about 10 dB. A photo far from anything the generator draws lands
well below 22 dB; one merely read wrong (sideways, washed out) may not, so read photos with
`data.images.to_rgb` as the README does."""


def report_fit(mse: torch.Tensor) -> None:
    """Log how well the projections redraw their images (PSNR, images in [-1, 1]); warn for each
    image redrawn so poorly that its labels describe another picture."""
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
    log.info("projected %d images into W+: PSNR %.1f dB (worst %.1f)", len(psnr), psnr.median(), psnr.min())
    for i in torch.nonzero(psnr < POOR_FIT_PSNR).flatten().tolist():
        log.warning("image %d is redrawn poorly by its projection (PSNR %.1f dB < %.0f): its labels describe "
                    "the redrawing, not the photo; check it is upright RGB of a face the generator can draw",
                    i, psnr[i], POOR_FIT_PSNR)


def stylegan2_identity(cfg: BackboneConfig, generator: StyleGAN2Generator | None = None) -> BackboneIdentity:
    """A weights file's identity from its tensors and stored architecture (cached beside it, any
    format, no model built); the random-weight default's from `generator` or a fresh build of it
    (they are tiny). Also checks `backbone.classes` and `backbone.noise` against the generator."""
    if cfg.weights is None:
        generator = generator or StyleGAN2Generator(cfg.stylegan2, seed=cfg.init_seed)
        arch = generator.cfg
        weights_hash = identity_hash(fingerprint.state_hash(generator), arch)
        check_settings(cfg, arch, generator.has_noise_const, "the random-weight generator")
    else:
        info = weights_info(local_weights(cfg))
        arch, weights_hash = info.arch, info.weights_hash
        check_settings(cfg, arch, info.noise_const, cfg.weights)
    feats = [f for f in feature_info(arch, cfg.rgb_taps)
             if not cfg.feature_resolutions or f[2] in cfg.feature_resolutions]
    return BackboneIdentity(weights_hash, arch.resolution, [n for n, _, _ in feats], [c for _, c, _ in feats])
