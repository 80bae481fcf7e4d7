"""Train a backbone itself on any folder of images, on Ray Train (`factory pretrain`).

`backbone.kind` picks what is trained, starting from the seeded random weights of the embedded
default (`backbone.init_seed`): a StyleGAN2 against a discriminator (`pretrain_gan.py`), the tiny
Stable Diffusion pipeline, VAE then prompt-conditioned UNet (`pretrain_diffusion.py`), or with
`pretrain.family: sd3` an SD3 pipeline whose MM-DiT learns flow matching on a reused VAE's latents
(`pretrain_flow.py`). This module is
the harness both share: the loop, the Ray Train worker, checkpoints and publishing.

Each worker runs the same Ray-free loop (`fit`): one step's draws are a function of (seed, rank,
step), so on CPU the same config, seed, folder and worker count give the same weights, and a resumed
run continues exactly where it stopped. Checkpoints carry the training state and the weights in
their published form; the last one is published to `pretrain.output` with a JSON record of how it
was made (config, seed, command line, the folder's content hash, losses, versions).
"""

from __future__ import annotations

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
from dataclasses import asdict

import torch

from factory import __version__, storage
from factory import config as config_lib
from factory.backbones.diffusion import files_of
from factory.config import FactoryConfig
from factory.data.image_folder import ImageFolder, load_image_folder
from factory.fingerprint import files_hash
from factory.recipes import lr_decay
from factory.recipes.pretrain_diffusion import PIPELINE_DIR, DiffusionRecipe
from factory.recipes.pretrain_flow import FlowRecipe
from factory.recipes.pretrain_gan import GAN_FILE, GanRecipe
from factory.recipes.ray_train import (
    STATE_FILE,
    check_finite,
    fit_on_ray,
    hashed_inputs,
    report_checkpoint,
    restore_state,
    step_generator,
    verify_checkpoint,
)

log = logging.getLogger(__name__)

RECORD_FILE = "pretrain.json"


def resolution_of(cfg: FactoryConfig) -> int:
    return cfg.backbone.stylegan2.resolution if cfg.backbone.kind == "stylegan2" else cfg.backbone.diffusion.resolution


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


def build_recipe(cfg: FactoryConfig, data: ImageFolder, device: torch.device, world_size: int = 1,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> GanRecipe | DiffusionRecipe | FlowRecipe:
    if cfg.backbone.kind == "stylegan2":
        return GanRecipe(cfg, data, device, world_size)
    if cfg.backbone.kind == "diffusion":
        recipe = FlowRecipe if cfg.pretrain.family == "sd3" else DiffusionRecipe
        return recipe(cfg, data, device, wrap, world_size)
    raise ValueError(f"backbone.kind must be 'stylegan2' or 'diffusion', got {cfg.backbone.kind!r}")


# --- the loop -----------------------------------------------------------------------------------


def fit(
    cfg: FactoryConfig,
    data: ImageFolder,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    restore: Callable[[], dict | None] | None = None,
    report: Callable[[dict, GanRecipe | DiffusionRecipe | FlowRecipe, int], None] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> tuple[GanRecipe | DiffusionRecipe | FlowRecipe, dict[str, float]]:
    """The training loop of one worker, free of Ray so it can be tested directly. `restore()` returns
    a saved state (or None); `report(metrics, recipe, step)` is called every `checkpoint_every` steps
    and at the end."""
    recipe = build_recipe(cfg, data, device, world_size, wrap)
    state = restore() if restore else None
    step = start_step = int(state["step"]) if state else 0
    last: dict[str, float] = dict(state["losses"]) if state else {}
    if step > recipe.total_steps:
        raise ValueError(f"pretrain.steps={cfg.pretrain.steps} makes a run of {recipe.total_steps} steps, fewer than the "
                         f"{step} this run has already taken: raise pretrain.steps to train on, or choose a new "
                         "pretrain.run_name to train afresh")
    if state:
        lr_decay.check_resume(state.get("lr_decay"), recipe.lr_decay, step)
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
        taken = recipe.train_step(step, step_generator(cfg.pretrain.seed, rank, step))
        check_finite(taken, step, "pretrain")
        losses.add(taken)
        pending = True
        step += 1
    return recipe, metrics


# --- Ray Train ----------------------------------------------------------------------------------


INPUTS = "images, backbone architecture or pretrain settings"
"""What `inputs_hash` covers, as messages name it."""


PRETRAIN_INPUTS = ("batch_size", "lr", "seed", "num_workers", "flip", "r1_gamma", "r1_every", "ema_half_life",
                   "vae_steps", "kl_weight", "prompt_dropout")
DIT_INPUTS = ("dit_layers", "dit_heads", "dit_head_dim", "dit_patch", "flow_shift")


def inputs_hash(cfg: FactoryConfig, data: ImageFolder) -> str:
    """What a checkpoint was trained on; resuming onto different inputs is refused."""
    return run_inputs(cfg, data)[0]


def input_parts(cfg: FactoryConfig, data: ImageFolder) -> dict[str, str]:
    """`inputs_hash`'s inputs by name, a hash each, so a refusal can say which of them changed."""
    return run_inputs(cfg, data)[1]


def run_inputs(cfg: FactoryConfig, data: ImageFolder) -> tuple[str, dict[str, str]]:
    """(`inputs_hash`, `input_parts`) in one pass (the reused VAE's folder hashed once)."""
    p, b = cfg.pretrain, cfg.backbone
    arch = asdict(b.stylegan2) if b.kind == "stylegan2" else {"resolution": b.diffusion.resolution}
    settings = {k: getattr(p, k) for k in PRETRAIN_INPUTS}
    inputs = {"images": data.content_hash, "kind": b.kind, "init_seed": b.init_seed, "arch": arch,
              "pretrain": list(settings.values())}
    extra = {}
    if b.kind == "diffusion" and (p.family != "sd" or p.vae_from is not None):  # older runs' hashes unchanged
        inputs["family"] = extra["family"] = p.family
        inputs["vae_from"] = extra["vae_from"] = vae_hash(p.vae_from)
        if p.family == "sd3":
            inputs["dit"] = [getattr(p, k) for k in DIT_INPUTS]
            extra |= {k: getattr(p, k) for k in DIT_INPUTS}
    if b.kind == "diffusion" and p.denoiser_ema:  # what is published, and the state a checkpoint holds
        inputs["denoiser_ema"] = extra["denoiser_ema"] = True
    section = "backbone.stylegan2" if b.kind == "stylegan2" else "backbone.diffusion"
    return hashed_inputs(inputs, {"the images": data.content_hash, "backbone.kind": b.kind,
                                  "backbone.init_seed": b.init_seed, **{f"{section}.{k}": v for k, v in arch.items()},
                                  **{f"pretrain.{k}": v for k, v in (settings | extra).items()}})


def vae_hash(folder: str | None) -> str | None:
    """Content hash of the VAE a run reuses (`pretrain.vae_from`), as pipeline folders are hashed."""
    if folder is None:
        return None
    vae = os.path.join(folder, "vae")
    if not os.path.isdir(vae):
        raise config_lib.ConfigError(f"pretrain.vae_from={folder}: no vae/ folder there (not a diffusers pipeline folder)")
    return files_hash(folder, files_of(folder, "vae"))


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
        return restore_state(expected, cfg.pretrain, "pretrain", INPUTS, device)

    def report(metrics: dict, recipe, step: int) -> None:
        def write(d: str) -> None:
            weights_hash = recipe.export(d)
            losses = {k: v for k, v in metrics.items() if k not in ("step", "start_step")}
            torch.save({"recipe": recipe.state_dict(), "step": step, "losses": losses, "inputs_hash": expected,
                        "lr_decay": recipe.lr_decay},
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


def run_steps(cfg: FactoryConfig) -> int:
    """The steps of the whole run, as the loop, its checkpoints and `pretrain.lr_restarts` count them:
    the SD family's VAE steps first, then its UNet's; a GAN's or an SD3 transformer's steps alone."""
    p = cfg.pretrain
    return p.vae_steps + p.steps if cfg.backbone.kind == "diffusion" and p.family == "sd" else p.steps


def check_restarts(cfg: FactoryConfig) -> None:
    """`pretrain.lr_restarts` counts the run's steps (`run_steps`): the last restart comes before its end."""
    p, total = cfg.pretrain, run_steps(cfg)
    if p.lr_restarts and p.lr_restarts[-1] >= total:
        counted = (f"pretrain.vae_steps={p.vae_steps} + pretrain.steps={p.steps}: the VAE's steps count first"
                   if total != p.steps else f"pretrain.steps={p.steps}")
        raise config_lib.ConfigError(f"pretrain.lr_restarts={p.lr_restarts}: the last restart must come before the "
                                     f"run's last step, {total} ({counted})")


def pretrain(cfg: FactoryConfig, command: str | None = None, data: ImageFolder | None = None) -> dict:
    """Train `backbone.kind` on `pretrain.images` and publish it to `pretrain.output`; returns the
    record written beside it. `command` is recorded as the command line (default: this process's);
    `data`: `pretrain.images` as `load_image_folder` read it, when the caller read it already (before
    starting Ray, so that a bad image is named in seconds)."""
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
    check_restarts(cfg)
    data = data or load_image_folder(p.images, resolution_of(cfg))
    log.info("pretrain: %d images from %s (%d with prompts)", len(data.files), p.images,
             sum(1 for t in data.prompts if t))

    # 2. Fit on Ray Train.
    hashed, parts = run_inputs(cfg, data)
    result = fit_on_ray(
        _worker,
        {"cfg": config_lib.to_dict(cfg), "data": asdict(data), "inputs_hash": hashed},
        p,
        "pretrain",
        INPUTS,
        parts,
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
        **({"family": p.family, "vae_from": {"folder": p.vae_from, "vae_hash": vae_hash(p.vae_from)}}
           if cfg.backbone.kind == "diffusion" and (p.family != "sd" or p.vae_from is not None) else {}),
        "num_workers": p.num_workers,
        "images": {"folder": p.images, "num_images": len(data.files), "content_hash": data.content_hash},
        "final_losses": {k: v for k, v in metrics.items() if k not in ("step", "start_step")},
        "wall_seconds": None,
        "versions": _versions(),
        "config_yaml": config_lib.to_yaml(cfg),
    }
    with result.checkpoint.as_directory() as d:
        verify_checkpoint(d, f"{p.storage_path}/{p.run_name}")
        with open(os.path.join(d, RECORD_FILE)) as f:
            record["weights_hash"] = json.load(f)["weights_hash"]
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        if cfg.backbone.kind == "stylegan2":
            storage.write_json(record_path(cfg), record)
            storage.put_file(os.path.join(d, GAN_FILE), p.output, keep_source=True)
        else:
            with tempfile.TemporaryDirectory(prefix="factory-pretrain-") as staging:
                folder = os.path.join(staging, PIPELINE_DIR)
                shutil.copytree(os.path.join(d, PIPELINE_DIR), folder)
                with open(os.path.join(folder, RECORD_FILE), "w") as f:
                    json.dump(record, f, indent=2, sort_keys=True)
                storage.publish_tree(folder, p.output)
    log.info("pretrained %s written to %s; final losses %s", cfg.backbone.kind, p.output, record["final_losses"])
    return record


def _versions() -> dict[str, str]:
    import diffusers

    return {"factory": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}
