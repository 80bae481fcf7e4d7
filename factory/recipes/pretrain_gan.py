"""`factory pretrain` for StyleGAN2: the generator of `backbone.stylegan2` against a residual
discriminator (`factory.backbones.discriminator`), non-saturating logistic loss, lazy R1 on reals
every `r1_every` steps, left-right flips, an EMA generator (`ema_half_life`) whose weights are
published, with `w_avg` tracked while training and recomputed for the EMA weights at export. No
path-length regularization and no style mixing (kept small; see the README)."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones.discriminator import StyleGAN2Discriminator
from factory.backbones.stylegan2 import StyleGAN2Generator
from factory.backbones.stylegan2_file import save_stylegan2
from factory.config import FactoryConfig
from factory.data.image_folder import ImageFolder
from factory.data.images import to_float
from factory.fingerprint import state_hash
from factory.recipes import lr_decay
from factory.recipes.ema import ema_copy, ema_update

GAN_FILE = "generator.safetensors"


def _sync_gradients(module: torch.nn.Module) -> None:
    """Average gradients over data-parallel workers. The GAN does this by hand instead of through DDP
    (as stylegan2-ada does): R1 differentiates D twice, and G's step runs D frozen, which DDP's
    gradient hooks do not expect."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


class GanRecipe:
    """One step: a generator step (non-saturating loss against D), then a discriminator step
    (logistic loss; every `r1_every` steps also the lazy R1 penalty on reals), then the EMA update."""

    def __init__(self, cfg: FactoryConfig, data: ImageFolder, device: torch.device, world_size: int) -> None:
        p, arch = cfg.pretrain, cfg.backbone.stylegan2
        self.p, self.device, self.world_size = p, device, world_size
        self.images = torch.from_numpy(np.array(data.images))  # a writable copy (Ray hands read-only arrays)
        self.generator = StyleGAN2Generator(arch, seed=cfg.backbone.init_seed).to(device).train()
        self.discriminator = StyleGAN2Discriminator(arch, seed=cfg.backbone.init_seed + 1).to(device).train()
        self.ema = ema_copy(self.generator)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=p.lr, betas=(0.0, 0.99), eps=1e-8)
        c = p.r1_every / (p.r1_every + 1)  # lazy regularization (paper, Sec. 3.1)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=p.lr * c, betas=(0.0, 0.99**c), eps=1e-8)
        self.total_steps = p.steps
        self.lr_decay = lr_decay.window(self.total_steps, p.lr_decay_steps, p.lr_restarts)
        self.base_lrs = [(self.opt_g, p.lr), (self.opt_d, p.lr * c)]

    def _fake(self, z: torch.Tensor, noise: list[torch.Tensor], track_w_avg: bool = False) -> torch.Tensor:
        w = self.generator.mapping(z, update_w_avg=track_w_avg)
        return self.generator.synthesis(w, noise)[0]

    def _draw(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = torch.randn(batch, self.generator.cfg.z_dim, generator=gen)
        noise = [torch.randn(batch, 1, *shape, generator=gen) for shape in self.generator.noise_shapes()]
        return z.to(self.device), [n.to(self.device) for n in noise]

    def train_step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        p, G, D = self.p, self.generator, self.discriminator
        lr_decay.apply(self.base_lrs, step, self.lr_decay)
        idx = torch.randint(len(self.images), (p.batch_size,), generator=gen)
        flip = torch.rand(p.batch_size, generator=gen) < 0.5
        real = self.images[idx]
        if p.flip:
            real = torch.where(flip[:, None, None, None], real.flip(2), real)
        real = to_float(real, self.device)
        z_g, noise_g = self._draw(p.batch_size, gen)
        z_d, noise_d = self._draw(p.batch_size, gen)

        # 1. Generator: make D call its fakes real.
        G.requires_grad_(True)
        D.requires_grad_(False)
        loss_g = F.softplus(-D(self._fake(z_g, noise_g, track_w_avg=True))).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        _sync_gradients(G)
        self.opt_g.step()

        # 2. Discriminator: logistic loss, plus lazy R1 (gamma/2 |grad D(real)|^2, x r1_every).
        G.requires_grad_(False)
        D.requires_grad_(True)
        with torch.no_grad():
            fake = self._fake(z_d, noise_d)
        do_r1 = p.r1_gamma > 0 and step % p.r1_every == 0
        real = real.detach().requires_grad_(do_r1)
        real_score = D(real)
        loss_d = F.softplus(D(fake)).mean() + F.softplus(-real_score).mean()
        losses = {"loss_g": loss_g.item(), "loss_d": loss_d.item()}
        if do_r1:
            (grad,) = torch.autograd.grad(real_score.sum(), real, create_graph=True)
            r1 = grad.square().sum(dim=(1, 2, 3)).mean()
            loss_d = loss_d + r1 * (p.r1_gamma / 2) * p.r1_every
            losses["r1"] = r1.item()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        _sync_gradients(D)
        self.opt_d.step()

        # 3. EMA generator (stylegan2-ada's schedule: a half-life in images, ramped up early on).
        batch = p.batch_size * self.world_size
        ema_update(self.ema, G, (step + 1) * batch, batch, p.ema_half_life)
        return losses

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "ema": self.ema.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.ema.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    def export(self, directory: str) -> str:
        """The EMA generator, its `w_avg` recomputed for its own weights, as `GAN_FILE`; returns its
        content hash (what `load_backbone` reports as `weights_hash`)."""
        generator = copy.deepcopy(self.ema).cpu()
        generator.compute_w_avg(4096, seed=self.p.seed)
        save_stylegan2(generator, os.path.join(directory, GAN_FILE))
        return state_hash(generator)
