"""Train a backbone itself on any folder of images, on Ray Train (`factory pretrain`).

`backbone.kind` picks what is trained, starting from the seeded random weights of the embedded
default (`backbone.init_seed`):

- stylegan2: the generator of `backbone.stylegan2` against a residual discriminator
  (`factory.backbones.discriminator`), non-saturating logistic loss, lazy R1 on reals every
  `r1_every` steps, left-right flips, an EMA generator (`ema_half_life`) whose weights are published,
  with `w_avg` tracked while training and recomputed for the EMA weights at export. No path-length
  regularization and no style mixing (kept small; see the README).
- diffusion: the tiny Stable Diffusion pipeline (`factory.backbones.tiny_diffusion`): first its VAE
  as a KL autoencoder (L1 reconstruction + `kl_weight` x KL) for `vae_steps`, then the VAE's
  `scaling_factor` is set to 1 / std of its latents and frozen, and the UNet learns DDPM's epsilon
  (or the scheduler's prediction type) on the VAE's latents, at the training timesteps and betas of
  the pipeline's scheduler config, conditioned on the frozen seeded CLIP text encoder's embedding of
  each image's prompt, dropped to "" with probability `prompt_dropout` for classifier-free guidance.

Each worker runs the same Ray-free loop (`fit`): one step's draws are a function of (seed, rank,
step), so on CPU the same config, seed, folder and worker count give the same weights, and a resumed
run continues exactly where it stopped. Checkpoints carry the training state and the weights in
their published form; the last one is published to `pretrain.output` with a JSON record of how it
was made (config, seed, command line, the folder's content hash, losses, versions).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from factory import __version__, storage
from factory import config as config_lib
from factory.backbones.discriminator import StyleGAN2Discriminator
from factory.backbones.stylegan2 import StyleGAN2Generator, save_stylegan2
from factory.config import FactoryConfig
from factory.fingerprint import state_hash, tensors_hash
from factory.objectives import TrainError, step_generator
from factory.ray_train import STATE_FILE, fit_on_ray, replace_local, report_checkpoint, restore_state
from factory.real_labels import IMAGE_EXTENSIONS, IMAGES_DIR, read_prompts, square

log = logging.getLogger(__name__)

GAN_FILE, PIPELINE_DIR, RECORD_FILE = "generator.safetensors", "pipeline", "pretrain.json"


class ImageFolderError(ValueError):
    """The training folder is missing, empty or holds bad files; `problems` lists each with its file."""

    def __init__(self, directory: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{directory}: {len(problems)} problem(s) with the training images:\n{lines}")


# --- the image folder ---------------------------------------------------------------------------


@dataclass
class ImageFolder:
    files: list[str]
    prompts: list[str]
    """One per image; "" where prompts.jsonl has no row for it."""
    images: np.ndarray
    """[N, R, R, 3] uint8 at the backbone's resolution."""

    @property
    def content_hash(self) -> str:
        """Identifies the training data as the model sees it (decoded pixels, names, prompts)."""
        return tensors_hash({"images": torch.from_numpy(self.images)},
                            {"files": json.dumps(self.files), "prompts": json.dumps(self.prompts)})


def load_image_folder(directory: str, resolution: int) -> ImageFolder:
    """Every image in `directory` (or its images/ folder), squared to `resolution`, with its prompt.
    Raises ImageFolderError listing every unreadable image and bad prompt row."""
    if not os.path.isdir(directory):
        raise ImageFolderError(directory, ["not a folder (pretrain.images)"])
    image_dir = os.path.join(directory, IMAGES_DIR)
    image_dir = image_dir if os.path.isdir(image_dir) else directory
    names = sorted(n for n in os.listdir(image_dir) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not names:
        raise ImageFolderError(directory, [f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}"])
    problems: list[str] = []
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(image_dir, name)) as im:
                images.append(np.array(square(im.convert("RGB"), resolution, Image.Resampling.BICUBIC)))
        except OSError as e:
            problems.append(f"{os.path.relpath(os.path.join(image_dir, name), directory)}: not a readable image ({e})")
    prompts = read_prompts(directory, names, None, problems)
    if problems:
        raise ImageFolderError(directory, problems)
    return ImageFolder(names, [prompts.get(n, "") for n in names], np.stack(images))


def resolution_of(cfg: FactoryConfig) -> int:
    return cfg.backbone.stylegan2.resolution if cfg.backbone.kind == "stylegan2" else cfg.backbone.diffusion.resolution


def to_float(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, R, R, 3] uint8 -> [B, 3, R, R] float in [-1, 1]."""
    return torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class _Losses:
    """Running means of named losses between reports (a loss computed only on some steps, like R1,
    is averaged over those steps)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


# --- StyleGAN2 ----------------------------------------------------------------------------------


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
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=p.lr, betas=(0.0, 0.99), eps=1e-8)
        c = p.r1_every / (p.r1_every + 1)  # lazy regularization (paper, Sec. 3.1)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=p.lr * c, betas=(0.0, 0.99**c), eps=1e-8)
        self.total_steps = p.steps

    def _fake(self, z: torch.Tensor, noise: list[torch.Tensor], track_w_avg: bool = False) -> torch.Tensor:
        w = self.generator.mapping(z, update_w_avg=track_w_avg)
        return self.generator.synthesis(w, noise)[0]

    def _draw(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = torch.randn(batch, self.generator.cfg.z_dim, generator=gen)
        noise = [torch.randn(batch, 1, *shape, generator=gen) for shape in self.generator.noise_shapes()]
        return z.to(self.device), [n.to(self.device) for n in noise]

    def train_step(self, step: int, gen: torch.Generator) -> dict[str, float]:
        p, G, D = self.p, self.generator, self.discriminator
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
        half_life = min(p.ema_half_life, (step + 1) * batch * 0.05)
        beta = 0.5 ** (batch / max(half_life, 1e-8))
        with torch.no_grad():
            for e, g in zip(self.ema.parameters(), G.parameters()):
                e.copy_(g.lerp(e, beta))
            for e, g in zip(self.ema.buffers(), G.buffers()):
                e.copy_(g)
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


# --- diffusion ----------------------------------------------------------------------------------


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
                 wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        from diffusers import DDPMScheduler

        from factory.backbones.tiny_diffusion import build_tiny_pipeline

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
        pipe.vae.register_to_config(sample_size=resolution)
        self.images = torch.from_numpy(np.array(data.images))  # a writable copy (Ray hands read-only arrays)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.vae_loss = wrap(_VAELoss(pipe.vae.train()).to(device))
        self.unet_loss = wrap(_UNetLoss(pipe.unet.train()).to(device))
        self.opt_vae = torch.optim.Adam(pipe.vae.parameters(), lr=p.lr)
        self.opt_unet = torch.optim.Adam(pipe.unet.parameters(), lr=p.lr)
        text_encoder = pipe.text_encoder.to(device).eval().requires_grad_(False)
        unique = sorted(set(data.prompts) | {""})
        with torch.no_grad():
            ids = pipe.tokenizer(unique, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.embeddings = text_encoder(ids.to(device))[0]
        self.prompt_index = torch.tensor([unique.index(t) for t in data.prompts])
        self.empty_index = unique.index("")
        self.scaling_factor: float | None = None
        self.total_steps = p.vae_steps + p.steps

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
        self.opt_unet.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_unet.step()
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
                "opt_vae": self.opt_vae.state_dict(), "opt_unet": self.opt_unet.state_dict(),
                "scaling_factor": self.scaling_factor}

    def load_state_dict(self, state: dict) -> None:
        self.pipe.vae.load_state_dict(state["vae"])
        self.pipe.unet.load_state_dict(state["unet"])
        self.opt_vae.load_state_dict(state["opt_vae"])
        self.opt_unet.load_state_dict(state["opt_unet"])
        if state["scaling_factor"] is not None:
            self.scaling_factor = float(state["scaling_factor"])
            self.pipe.vae.eval().requires_grad_(False).register_to_config(scaling_factor=self.scaling_factor)

    def export(self, directory: str) -> str:
        """The whole pipeline (`save_pretrained`, safetensors) under `PIPELINE_DIR`; returns its content
        hash, computed as `DiffusionBackbone.weights_hash` is (what `load_backbone` reports)."""
        if self.scaling_factor is None:  # a checkpoint during the VAE's steps: scale it, keep training it
            self.pipe.vae.register_to_config(scaling_factor=self._latent_scale())
        self.pipe.save_pretrained(os.path.join(directory, PIPELINE_DIR), safe_serialization=True)
        pipe = self.pipe
        return tensors_hash(
            {f"{part}.{k}": v for part in ("unet", "vae", "text_encoder")
             for k, v in getattr(pipe, part).state_dict().items()},
            {"tokenizer": repr(sorted(pipe.tokenizer.get_vocab().items())[:50]) + str(len(pipe.tokenizer))},
        )


def build_recipe(cfg: FactoryConfig, data: ImageFolder, device: torch.device, world_size: int = 1,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> GanRecipe | DiffusionRecipe:
    if cfg.backbone.kind == "stylegan2":
        return GanRecipe(cfg, data, device, world_size)
    if cfg.backbone.kind == "diffusion":
        return DiffusionRecipe(cfg, data, device, wrap)
    raise ValueError(f"backbone.kind must be 'stylegan2' or 'diffusion', got {cfg.backbone.kind!r}")


# --- the loop -----------------------------------------------------------------------------------


def fit(
    cfg: FactoryConfig,
    data: ImageFolder,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    restore: Callable[[], dict | None] | None = None,
    report: Callable[[dict, GanRecipe | DiffusionRecipe, int], None] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> tuple[GanRecipe | DiffusionRecipe, dict[str, float]]:
    """The training loop of one worker, free of Ray so it can be tested directly. `restore()` returns
    a saved state (or None); `report(metrics, recipe, step)` is called every `checkpoint_every` steps
    and at the end."""
    recipe = build_recipe(cfg, data, device, world_size, wrap)
    state = restore() if restore else None
    step = start_step = int(state["step"]) if state else 0
    last: dict[str, float] = dict(state["losses"]) if state else {}
    if state:
        recipe.load_state_dict(state["recipe"])
    losses, metrics, pending = _Losses(), {}, False
    while True:
        if step >= recipe.total_steps or (pending and step % cfg.pretrain.checkpoint_every == 0):
            last.update(losses.means())
            metrics = {"step": step, "start_step": start_step, **last}
            if report:
                report(metrics, recipe, step)
            pending = False
        if step >= recipe.total_steps:
            break
        losses.add(recipe.train_step(step, step_generator(cfg.pretrain.seed, rank, step)))
        pending = True
        step += 1
    return recipe, metrics


# --- Ray Train ----------------------------------------------------------------------------------


def inputs_hash(cfg: FactoryConfig, data: ImageFolder) -> str:
    """What a checkpoint was trained on; resuming onto different inputs is refused."""
    p, b = cfg.pretrain, cfg.backbone
    arch = asdict(b.stylegan2) if b.kind == "stylegan2" else {"resolution": b.diffusion.resolution}
    return config_lib.stable_hash({
        "images": data.content_hash, "kind": b.kind, "init_seed": b.init_seed, "arch": arch,
        "pretrain": [p.batch_size, p.lr, p.seed, p.num_workers, p.flip, p.r1_gamma, p.r1_every,
                     p.ema_half_life, p.vae_steps, p.kl_weight, p.prompt_dropout],
    })


def _worker(loop_config: dict) -> None:
    """Ray Train entry point on each worker: restore, fit, checkpoint through ray.train.report."""
    import ray.train
    import ray.train.torch

    cfg = config_lib.from_dict(loop_config["cfg"])
    storage.configure(cfg.storage)
    if not cfg.pretrain.use_gpu:
        torch.set_num_threads(max(1, int(cfg.pretrain.cpus_per_worker)))
    data = ImageFolder(**loop_config["data"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    expected = loop_config["inputs_hash"]

    def restore() -> dict | None:
        return restore_state(expected, cfg.pretrain, "pretrain",
                             "images, backbone architecture or pretrain settings", device)

    def report(metrics: dict, recipe, step: int) -> None:
        def write(d: str) -> None:
            weights_hash = recipe.export(d)
            losses = {k: v for k, v in metrics.items() if k not in ("step", "start_step")}
            torch.save({"recipe": recipe.state_dict(), "step": step, "losses": losses, "inputs_hash": expected},
                       os.path.join(d, STATE_FILE))
            with open(os.path.join(d, RECORD_FILE), "w") as f:
                json.dump({"weights_hash": weights_hash}, f)

        log.info("pretrain %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in metrics.items()))
        report_checkpoint(metrics, rank, write)

    fit(cfg, data, device, rank, world_size, restore, report, wrap=ray.train.torch.prepare_model)


def record_path(cfg: FactoryConfig) -> str:
    """Where the JSON record of a published backbone goes: beside the .safetensors file (same stem),
    or inside the pipeline folder."""
    out = cfg.pretrain.output
    return os.path.splitext(out)[0] + ".json" if cfg.backbone.kind == "stylegan2" else os.path.join(out, RECORD_FILE)


def pretrain(cfg: FactoryConfig, command: str | None = None) -> dict:
    """Train `backbone.kind` on `pretrain.images` and publish it to `pretrain.output`; returns the
    record written beside it. `command` is recorded as the command line (default: this process's)."""
    started = time.perf_counter()
    p = cfg.pretrain
    storage.configure(cfg.storage)
    # 1. Check inputs: where to publish, and every training image readable.
    if p.images is None:
        raise config_lib.ConfigError("pretrain.images is not set: point it at a folder of images")
    if p.output is None:
        raise config_lib.ConfigError("pretrain.output is not set: where should the trained weights go?")
    if cfg.backbone.weights is not None:
        log.info("pretrain starts from seeded random weights (backbone.init_seed=%d); backbone.weights=%s "
                 "is not read", cfg.backbone.init_seed, cfg.backbone.weights)
    data = load_image_folder(p.images, resolution_of(cfg))
    log.info("pretrain: %d images from %s (%d with prompts)", len(data.files), p.images,
             sum(1 for t in data.prompts if t))

    # 2. Fit on Ray Train.
    result = fit_on_ray(
        _worker,
        {"cfg": config_lib.to_dict(cfg), "data": asdict(data), "inputs_hash": inputs_hash(cfg, data)},
        p,
        "pretrain",
    )
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}

    # 3. Publish the weights from the last checkpoint: the record first, then the weights, each
    #    through a temporary name (a pipeline folder carries its record inside).
    record = {
        "kind": cfg.backbone.kind,
        "output": p.output,
        "command": command if command is not None else shlex.join([sys.executable, *sys.argv]),
        "seed": p.seed,
        "steps": int(metrics.get("step", 0)),
        "resumed_from_step": int(metrics.get("start_step", 0)),
        "vae_steps": p.vae_steps if cfg.backbone.kind == "diffusion" else None,
        "num_workers": p.num_workers,
        "images": {"folder": p.images, "num_images": len(data.files), "content_hash": data.content_hash},
        "final_losses": {k: v for k, v in metrics.items() if k not in ("step", "start_step")},
        "wall_seconds": None,
        "versions": _versions(),
        "config_yaml": config_lib.to_yaml(cfg),
    }
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, RECORD_FILE)) as f:
            record["weights_hash"] = json.load(f)["weights_hash"]
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        if cfg.backbone.kind == "stylegan2":
            storage.write_json(record_path(cfg), record)
            replace_local(os.path.join(d, GAN_FILE), p.output)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(p.output)), exist_ok=True)
            with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(p.output))) as staging:
                folder = os.path.join(staging, PIPELINE_DIR)
                shutil.copytree(os.path.join(d, PIPELINE_DIR), folder)
                with open(os.path.join(folder, RECORD_FILE), "w") as f:
                    json.dump(record, f, indent=2, sort_keys=True)
                replace_local(folder, p.output)
    log.info("pretrained %s written to %s; final losses %s", cfg.backbone.kind, p.output, record["final_losses"])
    return record


def _versions() -> dict[str, str]:
    import diffusers

    return {"factory": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}
