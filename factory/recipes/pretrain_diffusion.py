"""`factory pretrain` for the tiny Stable Diffusion pipeline (`factory.backbones.tiny_diffusion`):
first its VAE as a KL autoencoder (L1 reconstruction + `kl_weight` x KL) for `vae_steps`, then the
VAE's `scaling_factor` is set to 1 / std of its latents and frozen, and the UNet learns DDPM's epsilon
(or the scheduler's prediction type) on the VAE's latents, at the training timesteps and betas of
the pipeline's scheduler config, conditioned on the frozen seeded CLIP text encoder's embedding of
each image's prompt, dropped to "" with probability `prompt_dropout` for classifier-free guidance.
With `pretrain.vae_from`, a trained VAE (with its `scaling_factor`) is reused frozen and only the UNet
trains."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones.diffusion import component_files
from factory.config import FactoryConfig
from factory.data.image_folder import ImageFolder
from factory.data.images import to_float
from factory.fingerprint import files_hash
from factory.recipes import lr_decay
from factory.recipes.ema import ema_copy, ema_update
from factory.recipes.ray_train import TrainError

PIPELINE_DIR = "pipeline"


def frozen_vae(folder: str):
    """The VAE of the pipeline folder `folder` (`pretrain.vae_from`), frozen, in eval mode."""
    from diffusers import AutoencoderKL

    path = os.path.join(folder, "vae")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise TrainError(f"pretrain.vae_from={folder}: no vae/config.json there (not a diffusers pipeline folder)")
    try:
        vae = AutoencoderKL.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"pretrain.vae_from={folder}: cannot load its VAE: {str(e).strip().splitlines()[0]}") from None
    return vae.eval().requires_grad_(False)


class _VAELoss(torch.nn.Module):
    """The VAE's objective as one forward, so DDP sees it: L1 reconstruction of a posterior sample
    (eps drawn by the caller) and the KL to N(0, 1)."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps
        return (self.vae.decode(z).sample - x).abs().mean(), posterior.kl().mean() / x[0].numel()


class _UNetLoss(torch.nn.Module):
    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.unet(noisy, t, encoder_hidden_states=context).sample, target)


class DiffusionRecipe:
    """Steps 0 .. vae_steps-1 train the VAE, the rest the UNet on the frozen VAE's latents."""

    def __init__(self, cfg: FactoryConfig, data: ImageFolder, device: torch.device,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module], world_size: int = 1) -> None:
        from diffusers import DDPMScheduler

        from factory.backbones.tiny_diffusion import build_tiny_pipeline  # imports diffusers + transformers

        p = self.p = cfg.pretrain
        self.device = device
        pipe = self.pipe = build_tiny_pipeline(cfg.backbone.init_seed)
        pipe.set_progress_bar_config(disable=True)
        resolution = cfg.backbone.diffusion.resolution
        factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if resolution % factor:
            raise TrainError(f"backbone.diffusion.resolution={resolution} must be a multiple of {factor} "
                             "for the tiny pipeline")
        pipe.unet.register_to_config(sample_size=resolution // pipe.vae_scale_factor)
        if p.vae_from is not None:
            vae = frozen_vae(p.vae_from)
            shape = ("latent_channels", "block_out_channels")
            if [list(np.atleast_1d(vae.config[k])) for k in shape] != [list(np.atleast_1d(pipe.vae.config[k])) for k in shape]:
                raise TrainError(f"pretrain.vae_from={p.vae_from}: its VAE's latent channels or levels differ from "
                                 "the tiny pipeline's")
            pipe.register_modules(vae=vae)
        pipe.vae.register_to_config(sample_size=resolution)
        self.images = torch.from_numpy(np.array(data.images))  # a writable copy (Ray hands read-only arrays)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if p.vae_from is None:
            self.vae_loss = wrap(_VAELoss(pipe.vae.train()).to(device))
            self.opt_vae = torch.optim.Adam(pipe.vae.parameters(), lr=p.lr)
        else:  # reused frozen: no VAE phase
            pipe.vae.to(device)
            self.opt_vae = None
        self.unet_loss = wrap(_UNetLoss(pipe.unet.train()).to(device))
        self.opt_unet = torch.optim.Adam(pipe.unet.parameters(), lr=p.lr)
        self.ema = ema_copy(pipe.unet) if p.denoiser_ema else None  # what is published, with denoiser_ema
        self.batch = p.batch_size * world_size
        text_encoder = pipe.text_encoder.to(device).eval().requires_grad_(False)
        unique = sorted(set(data.prompts) | {""})
        with torch.no_grad():
            ids = pipe.tokenizer(unique, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.embeddings = text_encoder(ids.to(device))[0]
        self.prompt_index = torch.tensor([unique.index(t) for t in data.prompts])
        self.empty_index = unique.index("")
        self.scaling_factor: float | None = pipe.vae.config.scaling_factor if p.vae_from is not None else None
        self.total_steps = p.vae_steps + p.steps
        self.lr_decay = lr_decay.window(self.total_steps, p.lr_decay_steps, p.lr_restarts)  # the UNet's last steps

    def train_step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        p = self.p
        idx = torch.randint(len(self.images), (p.batch_size,), generator=gen)
        x = to_float(self.images[idx], self.device)
        if step < p.vae_steps:
            eps = torch.randn(p.batch_size, self.pipe.vae.config.latent_channels, x.shape[2] // self.pipe.vae_scale_factor,
                              x.shape[3] // self.pipe.vae_scale_factor, generator=gen).to(self.device)
            rec, kl = self.vae_loss(x, eps)
            loss = rec + p.kl_weight * kl
            self.opt_vae.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_vae.step()
            return {"loss_vae": rec.item(), "kl": kl.item()}

        vae = self.pipe.vae
        if self.scaling_factor is None:
            self._freeze_vae()
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=gen).to(self.device)
            latents = (posterior.mean + posterior.std * eps) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        num_t = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, num_t, (p.batch_size,), generator=gen).to(self.device)
        drop = torch.rand(p.batch_size, generator=gen) < p.prompt_dropout
        context = self.embeddings[torch.where(drop, self.empty_index, self.prompt_index[idx]).to(self.device)]
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = latents  # "sample"
        loss = self.unet_loss(noisy, t, context, target)
        lr_decay.apply([(self.opt_unet, p.lr)], step, self.lr_decay)
        self.opt_unet.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_unet.step()
        if self.ema is not None:
            ema_update(self.ema, self.pipe.unet, (step - p.vae_steps + 1) * self.batch, self.batch, p.ema_half_life)
        return {"loss_unet": loss.item()}

    @torch.no_grad()
    def _latent_scale(self) -> float:
        """1 / std of the VAE's latents (posterior means of up to 512 training images), as SD's
        0.18215 was chosen, so the noise schedule means what it says."""
        means = [self.pipe.vae.encode(to_float(self.images[i:i + 64], self.device)).latent_dist.mean
                 for i in range(0, min(len(self.images), 512), 64)]
        return 1.0 / float(torch.cat(means).std())

    def _freeze_vae(self) -> None:
        """Fix the VAE and its `scaling_factor` for the UNet's steps."""
        self.scaling_factor = self._latent_scale()
        self.pipe.vae.eval().requires_grad_(False).register_to_config(scaling_factor=self.scaling_factor)

    def state_dict(self) -> dict:
        return {"vae": self.pipe.vae.state_dict(), "unet": self.pipe.unet.state_dict(),
                "opt_vae": self.opt_vae.state_dict() if self.opt_vae else None, "opt_unet": self.opt_unet.state_dict(),
                "scaling_factor": self.scaling_factor, "ema_unet": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict) -> None:
        self.pipe.vae.load_state_dict(state["vae"])
        self.pipe.unet.load_state_dict(state["unet"])
        if self.opt_vae is not None:
            self.opt_vae.load_state_dict(state["opt_vae"])
        self.opt_unet.load_state_dict(state["opt_unet"])
        if self.ema is not None:  # a checkpoint without one has a different inputs hash: never resumed here
            self.ema.load_state_dict(state["ema_unet"])
        if state["scaling_factor"] is not None:
            self.scaling_factor = float(state["scaling_factor"])
            self.pipe.vae.eval().requires_grad_(False).register_to_config(scaling_factor=self.scaling_factor)

    def export(self, directory: str) -> str:
        """The whole pipeline (`save_pretrained`, safetensors) under `PIPELINE_DIR`; returns its content
        hash, computed as a pipeline folder's is (what `load_backbone` reports for it)."""
        if self.scaling_factor is None:  # a checkpoint during the VAE's steps: scale it, keep training it
            self.pipe.vae.register_to_config(scaling_factor=self._latent_scale())
        folder = os.path.join(directory, PIPELINE_DIR)
        save_pipeline(self.pipe, folder, "unet", self.ema)
        return files_hash(folder, component_files(folder))


def save_pipeline(pipe, folder: str, denoiser: str, ema: torch.nn.Module | None) -> None:
    """`save_pretrained` (safetensors) with the EMA copy, when there is one, in place of the trained
    `denoiser` component ("unet" or "transformer")."""
    trained = getattr(pipe, denoiser)
    if ema is not None:
        pipe.register_modules(**{denoiser: ema})
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        pipe.register_modules(**{denoiser: trained})
