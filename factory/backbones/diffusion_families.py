"""What differs between diffusers text-to-image families, one small adapter per family.

The family is read from the pipeline folder itself (`model_index.json`'s `_class_name`), never from
a name: `StableDiffusionPipeline` (SD 1.x/2.x, epsilon or v-prediction), `StableDiffusionXLPipeline`
(two text encoders, pooled embeddings, added time ids), `StableDiffusion3Pipeline` (MM-DiT, CLIP x2
+ T5) and `FluxPipeline` (double- and single-stream blocks, CLIP + T5, packed latents, embedded
guidance). Each adapter knows, for its family: the denoiser and its tappable blocks, how a denoiser
call shows its image-token grid, which attention layers to wrap, the samplers that fit, how the
pipeline schedules its timesteps, how a real image is noised for inversion (DDPM noising for the
UNets; the flow-matching interpolation `x_t = (1 - sigma) x0 + sigma noise` for SD3/FLUX) and how
the denoiser is called on it. `diffusion.DiffusionBackbone` composes one adapter with the taps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

UNET_SCHEDULERS = ("auto", "ddim", "euler", "euler_a", "dpmsolver++", "lcm")
FLOW_SCHEDULERS = ("auto", "flow_euler")
DEFAULT_DIT_BLOCKS = 4
"""Transformer blocks tapped when `feature_blocks` is empty: this many, evenly spaced."""


class FamilyError(ValueError):
    """A pipeline folder of a class we do not run, or a setting that does not fit its family."""


def read_model_index(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FamilyError(f"backbone.weights: {folder} has no model_index.json (not a diffusers pipeline folder)") from None
    except ValueError as e:
        raise FamilyError(f"backbone.weights: {path} is not valid JSON: {e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise FamilyError(f"backbone.weights: {path} names no pipeline class (_class_name)")
    return index


def read_config(folder: str, component: str) -> dict:
    path = os.path.join(folder, component, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FamilyError(f"backbone.weights: cannot read {path}: {e}") from None


def pick_blocks(count: int, chosen: Sequence[int], default_all: bool) -> list[int]:
    """Indices of the tapped blocks among `count`: `chosen` (negative counts from the end), or all,
    or `DEFAULT_DIT_BLOCKS` evenly spaced ones ending with the last."""
    if chosen:
        bad = [i for i in chosen if not -count <= i < count]
        if bad:
            raise FamilyError(f"backbone.diffusion.feature_blocks={list(chosen)}: {bad} out of range for {count} blocks")
        return sorted({i % count for i in chosen})
    if default_all or count <= DEFAULT_DIT_BLOCKS:
        return list(range(count))
    return sorted({round((k + 1) * count / DEFAULT_DIT_BLOCKS) - 1 for k in range(DEFAULT_DIT_BLOCKS)})


def vae_scale(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


class UNetFamily:
    """SD 1.x/2.x and SDXL: a UNet2DConditionModel, DDPM-type schedules, classifier-free guidance."""

    denoiser_name = "unet"
    flow = False
    tokens = False
    first_token = 1  # CLIP's start token takes most attention mass
    schedulers = UNET_SCHEDULERS

    def __init__(self, pipeline_class: str) -> None:
        self.pipeline_class = pipeline_class
        self.xl = pipeline_class == "StableDiffusionXLPipeline"

    def blocks(self, unet) -> list[torch.nn.Module]:
        """Down blocks, the mid block (a UNet configured with `mid_block_type: null` has none), up blocks."""
        return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]

    def call_info(self, unet):
        """(args, kwargs) of a UNet call -> (latent grid, 0)."""
        return lambda args, kwargs: (tuple((args[0] if args else kwargs["sample"]).shape[-2:]), 0)

    def attention_processors(self, unet, tap, tapped: list[int]) -> dict:
        from diffusers.models.attention_processor import AttnProcessor2_0

        from factory.backbones.diffusion_taps import CrossAttentionMapProcessor

        names = [self._block_prefix(unet, i) for i in tapped]
        return {name: CrossAttentionMapProcessor(tap) if name.endswith("attn2.processor") and name.startswith(tuple(names))
                else AttnProcessor2_0() for name in unet.attn_processors}

    @staticmethod
    def _block_prefix(unet, i: int) -> str:
        down, mid = len(unet.down_blocks), int(unet.mid_block is not None)
        if i < down:
            return f"down_blocks.{i}."
        return "mid_block." if i < down + mid else f"up_blocks.{i - down - mid}."

    def check_resolution(self, denoiser_config: dict, scale: int, resolution: int) -> None:
        factor = scale * 2 ** (len(denoiser_config["block_out_channels"]) - 1)
        if resolution % factor:
            raise FamilyError(f"backbone.diffusion.resolution={resolution} must be a multiple of {factor} for this pipeline")

    def probe(self, denoiser_config: dict, scale: int, cfg, tapped: list[int]) -> tuple[list[str], list[int]]:
        """(names, channels) of one step's features, from the UNet's config alone: built on PyTorch's
        meta device (no weights, no memory) and run once on empty tensors."""
        from diffusers import UNet2DConditionModel

        from factory.backbones.diffusion_taps import FeatureTap

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(denoiser_config)
        blocks = self.blocks(unet)
        tap = FeatureTap(unet, [blocks[i] for i in tapped], self.call_info(unet), False, cfg.max_prompt_tokens,
                         self.first_token, False)
        if cfg.attention_maps:
            unet.set_attn_processor(self.attention_processors(unet, tap, tapped))
        side = cfg.resolution // scale
        tap.start(1, False, [0])
        with torch.device("meta"):
            extra = {}
            if unet.config.addition_embed_type == "text_time":
                pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                extra = {"added_cond_kwargs": {"text_embeds": torch.empty(1, pooled), "time_ids": torch.empty(1, 6)}}
            unet(torch.empty(1, unet.config.in_channels, side, side), torch.tensor([500]),
                 encoder_hidden_states=torch.empty(1, 77, unet.config.cross_attention_dim), **extra)
        features = tap.finish()
        return [f"res{f.shape[-1]}" for f in features], [int(f.shape[1]) for f in features]

    def make_scheduler(self, name: str, current):
        from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                               EulerDiscreteScheduler, LCMScheduler)

        config = current.config
        if name == "auto":
            return type(current).from_config(config)
        if name == "ddim":
            return DDIMScheduler.from_config(config)
        if name == "euler":
            return EulerDiscreteScheduler.from_config(config)
        if name == "euler_a":
            return EulerAncestralDiscreteScheduler.from_config(config)
        if name == "dpmsolver++":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        if name == "lcm":
            return LCMScheduler.from_config(config)
        raise FamilyError(f"backbone.diffusion.scheduler={name} does not fit a {self.pipeline_class} (a UNet with a "
                          f"DDPM-type schedule); choose one of {', '.join(self.schedulers)}")

    def guided(self, pipe, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def noise_levels(self, pipe, steps: int, resolution: int) -> list[float]:
        """The timestep of each sampling step, as the pipeline schedules them."""
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return [float(round(float(t))) for t in scheduler.timesteps]

    def level_from_timestep(self, timestep: int) -> float:
        return float(timestep)

    def encode_images(self, pipe, x: torch.Tensor) -> torch.Tensor:
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor

    def conditioning(self, pipe, prompts: list[str], device, resolution: int, guidance_scale: float) -> dict:
        if not self.xl:
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": embeds}
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        size = (resolution, resolution)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(prompts), 1)}}

    def denoise_noised(self, pipe, latents, noise, level: float, cond: dict) -> None:
        """DDPM noising to timestep `level`, then one UNet pass."""
        from diffusers import DDPMScheduler

        t = torch.full((latents.shape[0],), int(level), dtype=torch.long, device=latents.device)
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
        pipe.unet(noisy, t, **cond)


class SD3Family:
    """SD3/SD3.5: an MM-DiT (joint image + text attention), patchified latents, flow matching."""

    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    flow = True
    tokens = True
    first_token = 1  # the CLIP part of the joint text sequence comes first, with its start token
    schedulers = FLOW_SCHEDULERS

    def blocks(self, transformer) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def block_prefixes(self, transformer, tapped: list[int]) -> list[str]:
        return [f"transformer_blocks.{i}.attn." for i in tapped]

    def patch(self, config: dict) -> int:
        return config["patch_size"]

    def call_info(self, transformer):
        """(args, kwargs) of a transformer call -> (patch grid, 0)."""
        p = transformer.config.patch_size

        def info(args: tuple, kwargs: dict) -> tuple[tuple[int, int], int]:
            x = args[0] if args else kwargs["hidden_states"]
            return (x.shape[-2] // p, x.shape[-1] // p), 0

        return info

    def wrapper(self):
        from factory.backbones.diffusion_taps import JointAttentionMapProcessor

        return JointAttentionMapProcessor

    def attention_processors(self, transformer, tap, tapped: list[int]) -> dict:
        prefixes = tuple(p + "processor" for p in self.block_prefixes(transformer, tapped))
        wrap = self.wrapper()
        return {name: wrap(tap, proc) if name in prefixes else proc for name, proc in transformer.attn_processors.items()}

    def grid(self, denoiser_config: dict, scale: int, resolution: int) -> int:
        return resolution // scale // self.patch(denoiser_config)

    def check_resolution(self, denoiser_config: dict, scale: int, resolution: int) -> None:
        factor = scale * self.patch(denoiser_config)
        if resolution % factor:
            raise FamilyError(f"backbone.diffusion.resolution={resolution} must be a multiple of {factor} for this pipeline")
        limit = denoiser_config.get("pos_embed_max_size")  # SD3's learned positions cover this many patches a side
        if limit and resolution // factor > limit:
            raise FamilyError(f"backbone.diffusion.resolution={resolution} is more than this transformer's position "
                              f"embedding covers: at most {limit * factor} ({limit} patches of {factor} px a side, "
                              "pos_embed_max_size)")

    def block_count(self, denoiser_config: dict) -> int:
        return denoiser_config["num_layers"]

    def probe(self, denoiser_config: dict, scale: int, cfg, tapped: list[int]) -> tuple[list[str], list[int]]:
        """One step's features from the config: every tapped block gives the inner width at the
        image-token grid; attention maps add `max_prompt_tokens`."""
        width = denoiser_config["num_attention_heads"] * denoiser_config["attention_head_dim"]
        channels = width * len(tapped) + (cfg.max_prompt_tokens if cfg.attention_maps else 0)
        return [f"res{self.grid(denoiser_config, scale, cfg.resolution)}"], [channels]

    def make_scheduler(self, name: str, current):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if name in ("auto", "flow_euler"):
            return FlowMatchEulerDiscreteScheduler.from_config(current.config)
        raise FamilyError(f"backbone.diffusion.scheduler={name} does not fit a {self.pipeline_class} (flow matching); "
                          f"choose one of {', '.join(self.schedulers)}")

    def guided(self, pipe, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def _shift_mu(self, scheduler, image_seq_len: int, max_shift_default: float) -> dict:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if not scheduler.config.get("use_dynamic_shifting", False):
            return {}
        c = scheduler.config
        return {"mu": calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                      c.get("base_shift", 0.5), c.get("max_shift", max_shift_default))}

    def noise_levels(self, pipe, steps: int, resolution: int) -> list[float]:
        """The sigma of each sampling step, as the pipeline schedules them."""
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        side = resolution // pipe.vae_scale_factor // pipe.transformer.config.patch_size
        scheduler.set_timesteps(steps, **self._shift_mu(scheduler, side * side, 1.16))
        return [float(s) for s in scheduler.sigmas[:steps]]

    def level_from_timestep(self, timestep: int) -> float:
        return timestep / 1000.0

    def encode_images(self, pipe, x: torch.Tensor) -> torch.Tensor:
        shift = pipe.vae.config.shift_factor or 0.0
        return (pipe.vae.encode(x).latent_dist.mean - shift) * pipe.vae.config.scaling_factor

    def conditioning(self, pipe, prompts: list[str], device, resolution: int, guidance_scale: float) -> dict:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def denoise_noised(self, pipe, latents, noise, level: float, cond: dict) -> None:
        """Flow matching: x_t = (1 - sigma) x0 + sigma noise; the transformer takes sigma * 1000."""
        noisy = (1.0 - level) * latents + level * noise
        t = torch.full((latents.shape[0],), level * 1000.0, device=latents.device, dtype=latents.dtype)
        pipe.transformer(hidden_states=noisy, timestep=t, return_dict=False, **cond)


class FluxFamily(SD3Family):
    """FLUX.1: double-stream (joint) then single-stream blocks, 2x2-packed latents with positional
    ids, T5 text only in the joint sequence (CLIP gives the pooled vector), embedded guidance."""

    pipeline_class = "FluxPipeline"
    first_token = 0  # T5 has no start token

    def blocks(self, transformer) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def block_prefixes(self, transformer, tapped: list[int]) -> list[str]:
        double = len(transformer.transformer_blocks)
        return [f"transformer_blocks.{i}.attn." if i < double else f"single_transformer_blocks.{i - double}.attn."
                for i in tapped]

    def patch(self, config: dict) -> int:
        return 2 * config.get("patch_size", 1)  # latents are packed 2x2 into tokens

    def call_info(self, transformer):
        """(args, kwargs) of a transformer call -> (grid from the image ids, text tokens)."""

        def info(args: tuple, kwargs: dict) -> tuple[tuple[int, int], int]:
            ids = kwargs["img_ids"]
            ids = ids[0] if ids.ndim == 3 else ids
            return (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1), kwargs["encoder_hidden_states"].shape[1]

        return info

    def wrapper(self):
        from factory.backbones.diffusion_taps import FluxAttentionMapProcessor

        return FluxAttentionMapProcessor

    def block_count(self, denoiser_config: dict) -> int:
        return denoiser_config["num_layers"] + denoiser_config["num_single_layers"]

    def guided(self, pipe, guidance_scale: float) -> bool:
        return False  # guidance is an input of the transformer (embedded), one pass per step

    def noise_levels(self, pipe, steps: int, resolution: int) -> list[float]:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        side = resolution // pipe.vae_scale_factor // 2
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, **self._shift_mu(scheduler, side * side, 1.15))
        return [float(s) for s in scheduler.sigmas[:steps]]

    def conditioning(self, pipe, prompts: list[str], device, resolution: int, guidance_scale: float) -> dict:
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full((len(prompts),), guidance_scale, device=device, dtype=torch.float32)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids, "guidance": guidance}

    def denoise_noised(self, pipe, latents, noise, level: float, cond: dict) -> None:
        """Flow matching on the unpacked latents, then packed 2x2 with their positional ids; FLUX's
        transformer takes sigma itself (the pipeline divides its timesteps by 1000)."""
        b, c, h, w = latents.shape
        noisy = pipe._pack_latents((1.0 - level) * latents + level * noise, b, c, h, w)
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        t = torch.full((b,), level, device=latents.device, dtype=latents.dtype)
        pipe.transformer(hidden_states=noisy, timestep=t, img_ids=ids, return_dict=False, **cond)


FAMILIES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def family_for(pipeline_class: str):
    """The adapter for a pipeline class; any other class is refused, naming the supported ones."""
    if pipeline_class in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        return UNetFamily(pipeline_class)
    if pipeline_class == "StableDiffusion3Pipeline":
        return SD3Family()
    if pipeline_class == "FluxPipeline":
        return FluxFamily()
    raise FamilyError(f"backbone.weights: a {pipeline_class} is not supported; supported pipelines: {', '.join(FAMILIES)}")


def tapped_blocks(family, denoiser_config: dict, chosen: Sequence[int]) -> list[int]:
    if family.tokens:
        return pick_blocks(family.block_count(denoiser_config), chosen, default_all=False)
    mid = denoiser_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    count = 2 * len(denoiser_config["block_out_channels"]) + mid
    return pick_blocks(count, chosen, default_all=True)
