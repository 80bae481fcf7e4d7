"""`factory pretrain` for an SD3-family pipeline (`pretrain.family: sd3`): an MM-DiT
(`SD3Transformer2DModel`, `pretrain.dit_*`) learning flow matching on the latents of a reused, frozen
VAE (`pretrain.vae_from`), conditioned on the frozen seeded tiny text encoders of
`tiny_families.build_tiny_sd3` (CLIP x2 + T5, embedded exactly as the pipeline's `encode_prompt` does
at sampling time), each prompt dropped to "" with probability `prompt_dropout` for classifier-free
guidance.

Flow matching as the pipeline's `FlowMatchEulerDiscreteScheduler` defines it: a training index is
drawn uniformly among its `num_train_timesteps`, giving sigma (shifted by `pretrain.flow_shift`) and
the timestep sigma x 1000 the transformer takes; x_t = (1 - sigma) x0 + sigma noise; the target is
noise - x0. x0 is a posterior sample of the frozen VAE, (z - shift_factor) x scaling_factor, the
posterior of every training image computed once (the VAE does not change)."""

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
from factory.recipes.pretrain_diffusion import PIPELINE_DIR, frozen_vae, save_pipeline
from factory.recipes.ray_train import TrainError


class _FlowLoss(torch.nn.Module):
    """The transformer's velocity regression as one forward, so DDP sees it."""

    def __init__(self, transformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, noisy, timestep, context, pooled, target) -> torch.Tensor:
        out = self.transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=context,
                               pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(out, target)


def build_transformer(p, latent_side: int, seed: int):
    """The MM-DiT of `pretrain.dit_*` for a `latent_side` x `latent_side` latent grid, seeded; its text
    widths fit the tiny SD3 text encoders (joint 64: CLIP 32 + 32 padded to T5's 64; pooled 64)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    width = p.dit_heads * p.dit_head_dim
    return SD3Transformer2DModel(
        sample_size=latent_side, patch_size=p.dit_patch, in_channels=4, out_channels=4, num_layers=p.dit_layers,
        attention_head_dim=p.dit_head_dim, num_attention_heads=p.dit_heads, caption_projection_dim=width,
        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=latent_side // p.dit_patch,
    )


class FlowRecipe:
    """Every step trains the transformer; the VAE and the text encoders stay frozen."""

    def __init__(self, cfg: FactoryConfig, data: ImageFolder, device: torch.device,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module], world_size: int = 1) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from factory.backbones.tiny_families import build_tiny_sd3  # imports diffusers + transformers

        p = self.p = cfg.pretrain
        self.device = device
        pipe = self.pipe = build_tiny_sd3(cfg.backbone.init_seed)
        pipe.set_progress_bar_config(disable=True)
        vae = frozen_vae(p.vae_from)
        if vae.config.latent_channels != 4:
            raise TrainError(f"pretrain.vae_from={p.vae_from}: its VAE has {vae.config.latent_channels} latent "
                             "channels; the SD3 transformer here takes 4")
        if vae.config.shift_factor is None:  # the SD3 pipeline decodes z / scale + shift
            vae.register_to_config(shift_factor=0.0)
        resolution = cfg.backbone.diffusion.resolution
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % (scale * p.dit_patch):
            raise TrainError(f"backbone.diffusion.resolution={resolution} must be a multiple of {scale * p.dit_patch} "
                             f"(VAE factor {scale} x pretrain.dit_patch={p.dit_patch})")
        vae.register_to_config(sample_size=resolution)
        pipe.register_modules(vae=vae, transformer=build_transformer(p, resolution // scale, cfg.backbone.init_seed),
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=p.flow_shift))
        self.train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.loss = wrap(_FlowLoss(pipe.transformer.train()).to(device))
        self.opt = torch.optim.Adam(pipe.transformer.parameters(), lr=p.lr)
        self.ema = ema_copy(pipe.transformer) if p.denoiser_ema else None  # what is published, with denoiser_ema
        self.batch = p.batch_size * world_size
        self.mean, self.std = self._posteriors(np.array(data.images))
        unique = sorted(set(data.prompts) | {""})
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(unique, None, None, device=device,
                                                      do_classifier_free_guidance=False)
        self.embeds, self.pooled = embeds.to(device), pooled.to(device)
        self.prompt_index = torch.tensor([unique.index(t) for t in data.prompts])
        self.empty_index = unique.index("")
        self.total_steps = p.steps
        self.lr_decay = lr_decay.window(self.total_steps, p.lr_decay_steps, p.lr_restarts)

    @torch.no_grad()
    def _posteriors(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen VAE's posterior mean and std of every training image, shifted and scaled as the
        pipeline scales latents."""
        vae = self.pipe.vae
        means, stds = [], []
        for i in range(0, len(images), 64):
            posterior = vae.encode(to_float(torch.from_numpy(images[i:i + 64]), torch.device("cpu"))).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        c = vae.config
        return (torch.cat(means) - c.shift_factor) * c.scaling_factor, torch.cat(stds) * c.scaling_factor

    def train_step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        p = self.p
        idx = torch.randint(len(self.mean), (p.batch_size,), generator=gen)
        eps = torch.randn(self.mean[idx].shape, generator=gen)
        latents = (self.mean[idx] + self.std[idx] * eps).to(self.device)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        u = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (p.batch_size,), generator=gen)
        sigma = self.train_scheduler.sigmas[u].to(self.device).view(-1, 1, 1, 1)
        timestep = self.train_scheduler.timesteps[u].to(self.device)
        drop = torch.rand(p.batch_size, generator=gen) < p.prompt_dropout
        text = torch.where(drop, self.empty_index, self.prompt_index[idx]).to(self.device)
        noisy = (1.0 - sigma) * latents + sigma * noise
        loss = self.loss(noisy, timestep, self.embeds[text], self.pooled[text], noise - latents)
        lr_decay.apply([(self.opt, p.lr)], step, self.lr_decay)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            ema_update(self.ema, self.pipe.transformer, (step + 1) * self.batch, self.batch, p.ema_half_life)
        return {"loss_flow": loss.item()}

    def state_dict(self) -> dict:
        return {"transformer": self.pipe.transformer.state_dict(), "opt": self.opt.state_dict(),
                "ema_transformer": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict) -> None:
        self.pipe.transformer.load_state_dict(state["transformer"])
        self.opt.load_state_dict(state["opt"])
        if self.ema is not None:  # a checkpoint without one has a different inputs hash: never resumed here
            self.ema.load_state_dict(state["ema_transformer"])

    def export(self, directory: str) -> str:
        """The whole pipeline (`save_pretrained`, safetensors) under `PIPELINE_DIR`; returns its content
        hash, computed as a pipeline folder's is (what `load_backbone` reports for it)."""
        folder = os.path.join(directory, PIPELINE_DIR)
        save_pipeline(self.pipe, folder, "transformer", self.ema)
        return files_hash(folder, component_files(folder))
