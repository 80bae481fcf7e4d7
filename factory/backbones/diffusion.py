"""A Stable Diffusion backbone: prompts + seeds -> images and the UNet's internal features.

Features come through diffusers' own extension points, never a patched copy of the UNet:

- forward hooks on every down, mid and up block record the block outputs;
- an attention processor on every cross-attention layer (`attn2`) also records the attention
  probabilities per prompt token (averaged over heads), then hands the layer to the stock processor,
  so the images are exactly what the bare pipeline makes;
- a forward pre-hook on the UNet counts denoising steps, and the taps record only at the configured
  step (the last by default), only the conditional half of a classifier-free-guidance batch.

The recorded maps are grouped by resolution: one feature map per latent resolution (block outputs and
the mean attention map of that resolution's cross-attention layers, concatenated along channels).

`invert()` taps the same features for real images (DatasetDM's inversion): VAE-encode, noise to a
timestep, one UNet pass with the image's prompt. No sampling loop and no VAE decode.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from factory import fingerprint
from factory.backbones.contract import BackboneIdentity, BackboneOutput

if TYPE_CHECKING:
    from factory.config import BackboneConfig, DiffusionConfig

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # torchvision-missing notices on import


class PipelineError(RuntimeError):
    """A pipeline folder or hub id could not be loaded; the message names it."""


class FeatureTap:
    """Records UNet block outputs and cross-attention maps during one armed UNet call."""

    def __init__(self, unet: torch.nn.Module, attention_maps: bool, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.armed = False
        self.target_call = -1
        self.calls = 0
        self.keep = slice(None)
        self.latent_hw = (0, 0)
        self.blocks: list[torch.Tensor] = []
        self.attention: dict[tuple[int, int], list[torch.Tensor]] = {}
        unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            block.register_forward_hook(self._on_block)
        if attention_maps:
            from diffusers.models.attention_processor import AttnProcessor2_0

            processors = {
                name: AttentionMapProcessor(self) if name.endswith("attn2.processor") else AttnProcessor2_0()
                for name in unet.attn_processors
            }
            unet.set_attn_processor(processors)

    def start(self, batch: int, guided: bool, call: int) -> None:
        """Record the `call`-th UNet call from now on, keeping the last `batch` rows (the conditional
        half of a guided batch)."""
        self.calls, self.target_call = 0, call
        self.keep = slice(batch, 2 * batch) if guided else slice(0, batch)
        self.blocks, self.attention = [], {}

    def finish(self) -> list[torch.Tensor]:
        """One [B, C, h, w] float32 map per resolution, finest first."""
        if not self.blocks:
            raise RuntimeError(f"no UNet call number {self.target_call} happened; nothing was recorded")
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        for x in self.blocks:
            groups.setdefault(tuple(x.shape[-2:]), []).append(x)
        for hw, maps in self.attention.items():
            groups.setdefault(hw, []).append(torch.stack(maps).mean(dim=0))
        out = [torch.cat(groups[hw], dim=1).float() for hw in sorted(groups, reverse=True)]
        self.blocks, self.attention, self.target_call = [], {}, -1
        return out

    def _on_unet_call(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = tuple(sample.shape[-2:])
        self.armed = self.calls == self.target_call
        self.calls += 1

    def _on_block(self, module, args, output) -> None:
        if self.armed:
            hidden = output[0] if isinstance(output, tuple) else output
            self.blocks.append(hidden[self.keep].detach())

    def record_attention(self, probs: torch.Tensor) -> None:
        """probs: [B, h*w, tokens] for the kept rows."""
        b, hw, _ = probs.shape
        lh, lw = self.latent_hw
        scale = math.sqrt(lh * lw / hw)
        h, w = round(lh / scale), round(lw / scale)
        tokens = probs[:, :, 1 : 1 + self.max_tokens]  # skip the start token, which takes most mass
        if tokens.shape[-1] < self.max_tokens:  # a tokenizer with a shorter context: pad with zeros
            tokens = torch.nn.functional.pad(tokens, (0, self.max_tokens - tokens.shape[-1]))
        self.attention.setdefault((h, w), []).append(tokens.transpose(1, 2).reshape(b, self.max_tokens, h, w).detach())


class AttentionMapProcessor:
    """Cross-attention that also records its attention probabilities when the tap is armed; the
    layer's output always comes from diffusers' stock processor."""

    def __init__(self, tap: FeatureTap) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.tap = tap
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if self.tap.armed and encoder_hidden_states is not None and hidden_states.ndim == 3:
            keep = self.tap.keep
            context = encoder_hidden_states[keep]
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(hidden_states[keep]))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key, None)  # [B * heads, h*w, tokens]
            b = probs.shape[0] // attn.heads
            self.tap.record_attention(probs.view(b, attn.heads, *probs.shape[1:]).mean(dim=1).float())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def make_scheduler(name: str, config):
    """A sampler built from the pipeline's own scheduler config (betas, offsets, prediction type)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose ddim, euler or dpmsolver++")


def load_pipeline(weights: str | None, init_seed: int, dtype: torch.dtype):
    """The pipeline at `weights` (a `save_pretrained` folder or a hub id), or the tiny built-in."""
    from diffusers import StableDiffusionPipeline

    if weights is None:
        from factory.backbones.tiny_diffusion import build_tiny_pipeline

        pipe = build_tiny_pipeline(init_seed)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    if "://" not in weights and not os.path.isdir(weights) and os.path.sep in weights:
        raise PipelineError(f"backbone.weights: no pipeline folder at {weights}")
    try:
        return StableDiffusionPipeline.from_pretrained(
            weights, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"backbone.weights: cannot load a Stable Diffusion pipeline from {weights}: {first}") from None


def pipeline_folder(weights: str) -> str:
    """The local folder of the pipeline `weights` names: the folder itself, or for a hub id its
    download in the Hugging Face cache (fetched once, where a hub is reachable)."""
    if os.path.isdir(weights):
        return weights
    if "://" not in weights and os.path.sep in weights:
        raise PipelineError(f"backbone.weights: no pipeline folder at {weights}")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(weights)
    except Exception as e:  # offline, unknown id, no access: one line naming it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"backbone.weights: cannot find a pipeline folder or hub id {weights}: {first}") from None


def component_files(folder: str) -> list[str]:
    """The files that make up a pipeline (relative paths): model_index.json and everything inside
    the component folders it lists, skipping hidden files such as the hash cache."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise PipelineError(f"backbone.weights: {folder} has no model_index.json (not a diffusers pipeline folder)")
    with open(index) as f:
        components = [k for k, v in json.load(f).items() if not k.startswith("_") and isinstance(v, list)]
    files = ["model_index.json"]
    for component in components:
        for root, _, names in os.walk(os.path.join(folder, component)):
            files += [os.path.relpath(os.path.join(root, n), folder) for n in names if not n.startswith(".")]
    return files


def folder_hash(folder: str) -> str:
    """The weights hash of a pipeline folder: its components' tensors as stored (so the same whatever
    dtype it later runs in), configs and tokenizer files; cached beside them."""
    files = component_files(folder)
    return fingerprint.cached_hash([os.path.join(folder, f) for f in files], folder, fingerprint.CACHE_FILE,
                                   lambda: fingerprint.files_hash(folder, files))


def built_pipeline_hash(pipe) -> str:
    """The weights hash of a pipeline held in memory (the tiny built-in): saved, then hashed as a
    folder would be."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="factory-pipeline-") as d:
        pipe.save_pretrained(d, safe_serialization=True)
        return fingerprint.files_hash(d, component_files(d))


def probe_features(unet_config: dict, vae_scale_factor: int, cfg: DiffusionConfig) -> tuple[list[str], list[int]]:
    """(names, channels) of the features the taps record, from the UNet's config alone: the UNet is
    built on PyTorch's meta device (no weights, no memory) and run once on empty tensors."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    tap = FeatureTap(unet, cfg.attention_maps, cfg.max_prompt_tokens)
    side = cfg.resolution // vae_scale_factor
    tap.start(1, False, 0)
    with torch.device("meta"):
        latents = torch.empty(1, unet.config.in_channels, side, side)
        context = torch.empty(1, 77, unet.config.cross_attention_dim)
        unet(latents, torch.tensor([500]), encoder_hidden_states=context)
    features = tap.finish()
    return [f"res{f.shape[-1]}" for f in features], [int(f.shape[1]) for f in features]


def check_resolution(unet_config: dict, vae_scale_factor: int, resolution: int) -> None:
    factor = vae_scale_factor * 2 ** (len(unet_config["block_out_channels"]) - 1)
    if resolution % factor:
        raise PipelineError(f"backbone.diffusion.resolution={resolution} must be a multiple of {factor} for this pipeline")


def identity(cfg: BackboneConfig) -> BackboneIdentity:
    """Weights hash and feature layout of the configured pipeline, from its files and configs (for
    the built-in tiny pipeline, from a fresh float32 build of it); never loads a folder's weights."""
    if cfg.weights is None:
        from factory.backbones.tiny_diffusion import build_tiny_pipeline

        pipe = build_tiny_pipeline(cfg.init_seed)
        unet_config, vae_scale = dict(pipe.unet.config), pipe.vae_scale_factor
        weights_hash = built_pipeline_hash(pipe)
    else:
        folder = pipeline_folder(cfg.weights)
        weights_hash = folder_hash(folder)
        with open(os.path.join(folder, "unet", "config.json")) as f:
            unet_config = json.load(f)
        with open(os.path.join(folder, "vae", "config.json")) as f:
            vae_scale = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    check_resolution(unet_config, vae_scale, cfg.diffusion.resolution)
    names, channels = probe_features(unet_config, vae_scale, cfg.diffusion)
    return BackboneIdentity(weights_hash, cfg.diffusion.resolution, names, channels)


class DiffusionBackbone:
    """Stable Diffusion as a backbone: `backbone(seeds, prompts)` samples one image per (seed, prompt)
    and returns it with the UNet features of the configured step; `invert(images, prompts, seeds)`
    taps the same features for real images."""

    def __init__(self, cfg: BackboneConfig, device: str | torch.device = "cpu") -> None:
        self.cfg: DiffusionConfig = cfg.diffusion
        self.device = torch.device(device)
        self.dtype = torch_dtype(self.cfg.dtype, self.device)
        pipe = load_pipeline(cfg.weights, cfg.init_seed, self.dtype)
        pipe.scheduler = make_scheduler(self.cfg.scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            part.eval().requires_grad_(False)
        self.pipe = pipe.to(self.device)
        self.resolution = self.cfg.resolution
        self.batch_invariant = cfg.batch_invariant
        self.tap = FeatureTap(pipe.unet, self.cfg.attention_maps, self.cfg.max_prompt_tokens)
        self.identity = identity(cfg)
        self.weights_hash = self.identity.weights_hash
        self.feature_channels = self.identity.feature_channels
        self.feature_names = self.identity.feature_names
        self.feature_step = self.cfg.feature_step % self.cfg.steps
        self.inversion_timestep = self._inversion_timestep()

    def accelerate(self, compile: bool = False, channels_last: bool = False) -> None:
        """Opt-in speed-ups for long builds: channels-last UNet and VAE, `torch.compile` of the UNet
        (its taps are forward hooks and an attention processor, which compile traces through)."""
        if channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
        if compile:
            self.pipe.unet = torch.compile(self.pipe.unet)

    def _inversion_timestep(self) -> int:
        """The configured inversion timestep, or (None) the timestep of the tapped sampling step, so
        training and generation see features at the same noise level."""
        if self.cfg.inversion_timestep is not None:
            return self.cfg.inversion_timestep
        scheduler = make_scheduler(self.cfg.scheduler, self.pipe.scheduler.config)
        scheduler.set_timesteps(self.cfg.steps)
        return int(round(float(scheduler.timesteps[self.feature_step])))

    @torch.no_grad()  # not inference_mode: training backpropagates through decoders fed these features
    def __call__(self, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> BackboneOutput:
        if prompts is None or len(prompts) != len(seeds):
            raise ValueError(f"a diffusion backbone needs one prompt per seed, got {len(seeds)} seeds and "
                             f"{None if prompts is None else len(prompts)} prompts")
        # Batched UNet passes differ from single ones in the last float bits, enough to flip a uint8
        # pixel; batch_invariant samples one seed at a time so a sample is a function of its seed alone.
        groups = ([[i] for i in range(len(seeds))] if self.batch_invariant else [list(range(len(seeds)))])
        parts = [self._sample([seeds[i] for i in g], [prompts[i] for i in g]) for g in groups]
        images = torch.cat([p[0] for p in parts])
        features = [torch.cat([p[1][k] for p in parts]) for k in range(len(parts[0][1]))]
        return BackboneOutput(images=images.contiguous(), features=features,
                              latents=torch.zeros(len(seeds), 0))

    def _sample(self, seeds: Sequence[int], prompts: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        guided = self.cfg.guidance_scale > 1.0
        self.tap.start(len(seeds), guided, self.feature_step)
        out = self.pipe(
            prompt=list(prompts),
            num_inference_steps=self.cfg.steps,
            guidance_scale=self.cfg.guidance_scale,
            height=self.resolution,
            width=self.resolution,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],  # same noise on any device
            output_type="pt",
        )
        features = self.tap.finish()
        images = (out.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return images, features

    @torch.no_grad()
    def invert(self, images: np.ndarray | torch.Tensor, prompts: Sequence[str], seeds: Sequence[int]) -> list[torch.Tensor]:
        """Real images ([B, H, W, 3] uint8 at `resolution`) -> the features generation taps: VAE
        encode (the posterior mean), noise seeded by `seeds` at the inversion timestep, one UNet pass
        conditioned on `prompts`."""
        from diffusers import DDPMScheduler

        pipe = self.pipe
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        x = x.to(self.device, self.dtype)
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds
        ]).to(self.device, self.dtype)
        t = torch.full((len(seeds),), self.inversion_timestep, dtype=torch.long, device=self.device)
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
        embeds, _ = pipe.encode_prompt(list(prompts), self.device, 1, False)
        self.tap.start(len(seeds), False, 0)
        pipe.unet(noisy, t, encoder_hidden_states=embeds)
        return self.tap.finish()


def check_prompt_lengths(weights: str | None, texts: list[str], source: str) -> None:
    """Refuse prompts longer than the pipeline's text encoder takes (CLIP would cut them silently),
    naming the first few by their row in `source`. Only the tokenizer is loaded."""
    from transformers import CLIPTokenizer

    if weights is None:  # the tiny built-in pipeline: CLIP's 77-token context
        from factory.backbones.tiny_diffusion import build_tiny_pipeline

        tokenizer = build_tiny_pipeline(0).tokenizer
    else:
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(pipeline_folder(weights), "tokenizer"))
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths) if n > limit]
    if long:
        shown = ", ".join(f"prompt {i + 1} ({n} tokens)" for i, n in long[:5])
        raise ValueError(f"{source}: {len(long)} prompts longer than the text encoder's {limit} tokens: {shown}; "
                            "shorten them")
