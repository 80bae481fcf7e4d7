"""A diffusers text-to-image backbone: prompts + seeds -> images and the denoiser's internal features.

The family (SD 1.x/2.x, SDXL, SD3, FLUX) is read from the pipeline folder's `model_index.json`;
`diffusion_families` holds what differs between families, `diffusion_taps` the feature taps (forward
hooks on the denoiser's blocks, attention processors wrapping the stock ones), so the images are
exactly what the bare pipeline makes. The taps record only at the configured sampling steps
(`feature_steps`), only the conditional half of a classifier-free-guidance batch; the maps are grouped
by resolution and concatenated across steps.

`invert()` taps the same features for real images (DatasetDM's inversion): VAE-encode, noise to the
noise level of each tapped step (DDPM noising for UNets, flow-matching interpolation for SD3/FLUX),
one denoiser pass per level with the image's prompt. No sampling loop and no VAE decode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from factory import fingerprint
from factory.backbones.contract import BackboneIdentity, BackboneOutput
from factory.backbones.diffusion_families import (FamilyError, family_for, read_config, read_model_index, tapped_blocks,
                                                  vae_scale)
from factory.backbones.diffusion_taps import FeatureTap

if TYPE_CHECKING:
    from factory.config import BackboneConfig, DiffusionConfig

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # torchvision-missing notices on import


class PipelineError(ValueError):
    """A pipeline folder or hub id could not be loaded; the message names it (bad input: exit 2)."""


NOT_LOADED = ("safety_checker",)
"""Components a folder may list that the factory never loads (passed as None)."""


def listed_components(folder: str, index: dict) -> list[str]:
    """The components `model_index.json` lists, each of which must be a folder of `folder` unless
    it is listed as saved without (`[null, null]`) or never loaded (`NOT_LOADED`): a missing one is
    refused, naming it (diffusers would build some, a tokenizer, from the pipeline's root instead,
    and fail at the first prompt)."""
    listed = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    missing = [k for k in listed if index[k][:1] != [None] and k not in NOT_LOADED
               and not os.path.isdir(os.path.join(folder, k))]
    if missing:
        raise PipelineError(f"backbone.weights: {folder} has no {', '.join(m + '/' for m in missing)} folder, which "
                            f"its model_index.json lists; copy the whole pipeline folder")
    return listed


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": float32 on CPU; on CUDA bfloat16 where the GPU supports it, else float16."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def make_scheduler(name: str, pipe):
    """A sampler for `pipe` built from its own scheduler config; refused when it misfits the family."""
    return family_for(type(pipe).__name__).make_scheduler(name, pipe.scheduler)


def supported_index(folder: str) -> dict:
    """The folder's model_index.json, of a pipeline class we run, with every component it lists
    present (`listed_components`); else a PipelineError naming what is wrong."""
    try:
        index = read_model_index(folder)
        family_for(index["_class_name"])
    except FamilyError as e:
        raise PipelineError(str(e)) from None
    listed_components(folder, index)
    return index


def load_pipeline(weights: str | None, init_seed: int, dtype: torch.dtype):
    """The pipeline at `weights` (a `save_pretrained` folder or a hub id), its class read from the
    folder's model_index.json, or the tiny built-in SD pipeline."""
    import diffusers

    if weights is None:
        from factory.backbones.tiny_diffusion import build_tiny_pipeline

        pipe = build_tiny_pipeline(init_seed)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    folder = pipeline_folder(weights)
    index = supported_index(folder)
    name = index["_class_name"]
    # Components the folder was saved without (`[null, null]`, e.g. SD3 without its T5) are passed as
    # None, which is how diffusers loads them; from_pretrained alone asks for them.
    extra = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[:1] == [None]}
    if name == "StableDiffusionPipeline":
        extra.update(safety_checker=None, requires_safety_checker=False)
    try:
        return getattr(diffusers, name).from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError, EnvironmentError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"backbone.weights: cannot load a {name} from {weights}: {first}") from None


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
    try:
        components = listed_components(folder, read_model_index(folder))
    except FamilyError as e:
        raise PipelineError(str(e)) from None
    return ["model_index.json"] + [f for component in components for f in files_of(folder, component)]


def files_of(folder: str, component: str) -> list[str]:
    """The files of one component folder of a pipeline (paths relative to `folder`), hidden ones skipped."""
    return [os.path.relpath(os.path.join(root, n), folder)
            for root, _, names in os.walk(os.path.join(folder, component)) for n in names if not n.startswith(".")]


def folder_hash(folder: str) -> str:
    """The weights hash of a pipeline folder: its components' tensors as stored (so the same whatever
    dtype it later runs in), configs and tokenizer files; cached beside them."""
    files = component_files(folder)
    try:
        return fingerprint.cached_hash([os.path.join(folder, f) for f in files], folder, fingerprint.CACHE_FILE,
                                       lambda: fingerprint.files_hash(folder, files))
    except ValueError as e:  # a truncated or corrupt weights file, named
        raise PipelineError(f"backbone.weights: {e}") from None


def built_pipeline_hash(pipe) -> str:
    """The weights hash of a pipeline held in memory (the tiny built-in): saved, then hashed as a
    folder would be."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="factory-pipeline-") as d:
        pipe.save_pretrained(d, safe_serialization=True)
        return fingerprint.files_hash(d, component_files(d))


def normalised(family, cfg: DiffusionConfig) -> bool:
    return cfg.feature_norm == "robust" or (cfg.feature_norm == "auto" and family.tokens)


def identity(cfg: BackboneConfig) -> BackboneIdentity:
    """Weights hash and feature layout of the configured pipeline, from its files and configs (for
    the built-in tiny pipeline, from a fresh float32 build of it); never loads a folder's weights.
    Feature names say the resolution, the tapped steps and a normalisation when there is one
    (`res16@9+robust`), so a decoder fitted on other features is refused."""
    if cfg.weights is None:
        from factory.backbones.tiny_diffusion import build_tiny_pipeline

        pipe = build_tiny_pipeline(cfg.init_seed)
        family = family_for(type(pipe).__name__)
        denoiser_config, scale = dict(pipe.unet.config), pipe.vae_scale_factor
        weights_hash = built_pipeline_hash(pipe)
    else:
        folder = pipeline_folder(cfg.weights)
        try:
            family = family_for(read_model_index(folder)["_class_name"])
            denoiser_config = read_config(folder, family.denoiser_name)
            scale = vae_scale(read_config(folder, "vae"))
        except FamilyError as e:
            raise PipelineError(str(e)) from None
        weights_hash = folder_hash(folder)
    d = cfg.diffusion
    try:
        family.check_resolution(denoiser_config, scale, d.resolution)
        tapped = tapped_blocks(family, denoiser_config, d.feature_blocks)
    except FamilyError as e:
        raise PipelineError(str(e)) from None
    names, channels = family.probe(denoiser_config, scale, d, tapped)
    steps = sorted(s % d.steps for s in d.feature_steps)
    suffix = "@" + ",".join(map(str, steps)) if steps != [d.steps - 1] else ""
    suffix += "+robust" if normalised(family, d) else ""
    names, channels = [n + suffix for n in names], [c * len(steps) for c in channels]
    if d.image_features:
        names, channels = [*names, f"rgb{d.resolution}"], [*channels, 3]
    return BackboneIdentity(weights_hash, d.resolution, names, channels)


class DiffusionBackbone:
    """A diffusers text-to-image pipeline as a backbone: `backbone(seeds, prompts)` samples one image
    per (seed, prompt) and returns it with the denoiser features of the configured steps;
    `invert(images, prompts, seeds)` taps the same features for real images."""

    def __init__(self, cfg: BackboneConfig, device: str | torch.device = "cpu") -> None:
        self.cfg: DiffusionConfig = cfg.diffusion
        self.device = torch.device(device)
        self.dtype = torch_dtype(self.cfg.dtype, self.device)
        self.identity = identity(cfg)  # before loading: a misfit resolution or block fails early
        pipe = load_pipeline(cfg.weights, cfg.init_seed, self.dtype)
        self.family = family_for(type(pipe).__name__)
        try:
            pipe.scheduler = self.family.make_scheduler(self.cfg.scheduler, pipe.scheduler)
        except FamilyError as e:
            raise PipelineError(str(e)) from None
        pipe.set_progress_bar_config(disable=True)
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):
                part.eval().requires_grad_(False)
        self.pipe = pipe.to(self.device)
        self.resolution = self.cfg.resolution
        self.batch_invariant = cfg.batch_invariant
        denoiser = getattr(pipe, self.family.denoiser_name)
        tapped = tapped_blocks(self.family, dict(denoiser.config), self.cfg.feature_blocks)
        blocks = self.family.blocks(denoiser)
        self.tap = FeatureTap(denoiser, [blocks[i] for i in tapped], self.family.call_info(denoiser), self.family.tokens,
                              self.cfg.max_prompt_tokens, self.family.first_token, normalised(self.family, self.cfg))
        if self.cfg.attention_maps:
            denoiser.set_attn_processor(self.family.attention_processors(denoiser, self.tap, tapped))
        self.weights_hash = self.identity.weights_hash
        self.feature_channels = self.identity.feature_channels
        self.feature_names = self.identity.feature_names
        self.feature_steps = sorted(s % self.cfg.steps for s in self.cfg.feature_steps)
        self.noise_levels = self._noise_levels()

    def accelerate(self, compile: bool = False, channels_last: bool = False) -> None:
        """Opt-in speed-ups for long builds: channels-last UNet and VAE, `torch.compile` of the
        denoiser (its taps are forward hooks and attention processors, which compile traces through)."""
        name = self.family.denoiser_name
        if channels_last:
            if name == "unet":
                self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
        if compile:
            setattr(self.pipe, name, torch.compile(getattr(self.pipe, name)))

    def _noise_levels(self) -> list[float]:
        """The noise level (UNet timestep, or flow-matching sigma) inversion uses for each tapped
        step: the configured inversion timestep, or the level of the step in the sampling schedule,
        so training and generation see features at the same noise levels."""
        if self.cfg.inversion_timestep is not None:
            return [self.family.level_from_timestep(self.cfg.inversion_timestep)]
        levels = self.family.noise_levels(self.pipe, self.cfg.steps, self.resolution)
        return [levels[s] for s in self.feature_steps]

    @property
    def inversion_timestep(self) -> float:
        """The noise level of the first tapped step (the only one in the default configuration)."""
        return self.noise_levels[0]

    @torch.no_grad()  # not inference_mode: training backpropagates through decoders fed these features
    def __call__(self, seeds: Sequence[int], prompts: Sequence[str] | None = None) -> BackboneOutput:
        if prompts is None or len(prompts) != len(seeds):
            raise ValueError(f"a diffusion backbone needs one prompt per seed, got {len(seeds)} seeds and "
                             f"{None if prompts is None else len(prompts)} prompts")
        # Batched denoiser passes differ from single ones in the last float bits, enough to flip a uint8
        # pixel; batch_invariant samples one seed at a time so a sample is a function of its seed alone.
        groups = ([[i] for i in range(len(seeds))] if self.batch_invariant else [list(range(len(seeds)))])
        parts = [self._sample([seeds[i] for i in g], [prompts[i] for i in g]) for g in groups]
        images = torch.cat([p[0] for p in parts])
        features = [torch.cat([p[1][k] for p in parts]) for k in range(len(parts[0][1]))]
        return BackboneOutput(images=images.contiguous(), features=features,
                              latents=torch.zeros(len(seeds), 0))

    def _sample(self, seeds: Sequence[int], prompts: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.tap.start(len(seeds), self.family.guided(self.pipe, self.cfg.guidance_scale), self.feature_steps)
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
        if self.cfg.image_features:  # the sample's own pixels, as `invert` gives a real image's
            features.append(pixels(images).to(self.device))
        return images, features

    @torch.no_grad()
    def invert(self, images: np.ndarray | torch.Tensor, prompts: Sequence[str], seeds: Sequence[int]) -> list[torch.Tensor]:
        """Real images ([B, H, W, 3] uint8 at `resolution`) -> the features generation taps: VAE
        encode (the posterior mean), noise seeded by `seeds` to each tapped step's noise level, one
        denoiser pass per level conditioned on `prompts`."""
        pipe, family = self.pipe, self.family
        x = pixels(torch.as_tensor(np.asarray(images)))
        latents = family.encode_images(pipe, x.to(self.device, pipe.vae.dtype))
        latents = latents.to(getattr(pipe, family.denoiser_name).dtype)
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds
        ]).to(self.device, latents.dtype)
        cond = family.conditioning(pipe, list(prompts), self.device, self.resolution, self.cfg.guidance_scale)
        self.tap.start(len(seeds), False, range(len(self.noise_levels)))
        for level in self.noise_levels:
            family.denoise_noised(pipe, latents, noise, level, cond)
        features = self.tap.finish()
        if self.cfg.image_features:
            features.append(x.to(self.device))
        return features


def pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [-1, 1] (what the VAE encodes, and the image feature)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _first_words(text: str, count: int = 6) -> str:
    words = text.split()
    return " ".join(words[:count]) + (" ..." if len(words) > count else "")


def check_prompt_lengths(weights: str | None, texts: list[str], source: str, where: list[str] | None = None) -> None:
    """Refuse prompts longer than the pipeline's text encoder takes (CLIP would cut them silently),
    naming the first few by where they came from (`where[i]`, e.g. `prompts.txt:7`; else their row
    in `source`) and their first words. Only the tokenizer is loaded, from a folder of a
    pipeline class we run with every component it lists (else refused, naming it)."""
    from transformers import CLIPTokenizer

    if weights is None:  # the tiny built-in pipeline: CLIP's 77-token context
        from factory.backbones.tiny_diffusion import build_tiny_pipeline

        tokenizer = build_tiny_pipeline(0).tokenizer
    else:  # CLIP's tokenizer: `tokenizer`, or `tokenizer_2` in an SDXL folder saved without the first
        folder = pipeline_folder(weights)
        supported_index(folder)  # refused here, before prompts are stored or labels imported
        found = [d for d in ("tokenizer", "tokenizer_2") if os.path.isdir(os.path.join(folder, d))]
        if not found:
            raise PipelineError(f"backbone.weights: {folder} has no tokenizer/ folder to count prompt tokens with")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, found[0]))
        except (OSError, ValueError, TypeError) as e:
            raise PipelineError(f"backbone.weights: cannot read {folder}/{found[0]}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths) if n > limit]
    if long:
        shown = ", ".join(f"{where[i] if where and where[i] else f'prompt {i + 1}'} ({n} tokens: "
                          f"{_first_words(texts[i])!r})" for i, n in long[:5])
        raise ValueError(f"{source}: {len(long)} prompts longer than the text encoder's {limit} tokens: {shown}; "
                            "shorten them")
