"""Typed configuration: one dataclass per section, loaded through `OmegaConf.structured`.

The dataclass defaults *are* the embedded default (a tiny built-in StyleGAN2 and a toy class list),
so `factory demo` needs no file. YAML files under `configs/` overlay them; `key=value` arguments
overlay the file. Unknown keys, wrong types and bad values raise `ConfigError` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from factory.backbones.stylegan2 import StyleGAN2Config


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


@dataclass
class RayConfig:
    address: str | None = None
    """Cluster to join ("auto", "ray://head:10001"). None joins the job's cluster when run by
    `ray job submit` (RAY_ADDRESS is set), else starts a local cluster in this process."""
    num_cpus: int | None = 4
    """Logical CPUs of a local cluster. More than the physical cores lets fractional actors and
    Ray Train's controller share a 2-core machine without deadlock. Ignored when joining a cluster."""


@dataclass
class StorageConfig:
    endpoint_url: str | None = None
    """S3 endpoint for s3:// URLs (MinIO, on-prem, a local test server); None means AWS itself."""
    region: str | None = None
    """S3 region; None lets the AWS credential chain decide."""
    anonymous: bool = False
    """Access public buckets without credentials. Otherwise credentials come from the standard AWS
    chain (environment, profile, instance or pod role), never from config files."""


SCHEDULERS = ("ddim", "euler", "dpmsolver++")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class DiffusionConfig:
    """Sampling and feature-tap settings of a Stable Diffusion backbone (`backbone.kind: diffusion`)."""

    scheduler: str = "ddim"
    """Sampler: "ddim", "euler" or "dpmsolver++" (DPM-Solver++ 2M), built from the pipeline's own
    scheduler config, so few-step schedules work with any checkpoint."""
    steps: int = 10
    """Denoising steps per image."""
    guidance_scale: float = 7.5
    """Classifier-free guidance; 1.0 turns guidance off (one UNet pass per step instead of two)."""
    resolution: int = 64
    """Image size in pixels (a multiple of 8 times the UNet's downsampling); real checkpoints want
    512 (SD 1.x) or 768 (SD 2.x)."""
    dtype: str = "auto"
    """Weights and activations: "auto" is float32 on CPU and float16 on CUDA; or "float32",
    "float16", "bfloat16"."""
    feature_step: int = -1
    """Denoising step whose UNet features (and attention maps) the decoder reads; -1 is the last."""
    inversion_timestep: int | None = None
    """Real images are VAE-encoded, noised to this timestep (0-999) and passed through the UNet once
    to tap the same features (the paper's inversion). None uses the timestep of `feature_step` in
    the sampling schedule, so the decoder is trained and applied at the same noise level."""
    attention_maps: bool = True
    """Also tap the cross-attention maps (per prompt token, averaged over heads) of every UNet block."""
    max_prompt_tokens: int = 8
    """Cross-attention tokens kept as features (after the start token); the tokenizer's full length
    (77) costs memory and rarely helps."""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"backbone.diffusion.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"backbone.diffusion.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.steps < 1:
            raise ConfigError(f"backbone.diffusion.steps must be >= 1, got {self.steps}")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"backbone.diffusion.resolution must be a multiple of 8, got {self.resolution}")
        if not -self.steps <= self.feature_step < self.steps:
            raise ConfigError(
                f"backbone.diffusion.feature_step must index one of the {self.steps} steps, got {self.feature_step}"
            )
        if self.inversion_timestep is not None and not 0 <= self.inversion_timestep < 1000:
            raise ConfigError(f"backbone.diffusion.inversion_timestep must be in [0, 1000), got {self.inversion_timestep}")
        if self.guidance_scale < 1.0:
            raise ConfigError(f"backbone.diffusion.guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"backbone.diffusion.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


@dataclass
class BackboneConfig:
    kind: str = "stylegan2"
    """Which generator: "stylegan2" (DatasetGAN: seeds -> images) or "diffusion" (DatasetDM: a
    Stable Diffusion pipeline, prompts + seeds -> images)."""
    weights: str | None = None
    """stylegan2: a safetensors file written by `save_stylegan2`. diffusion: a Stable Diffusion 1.x/2.x
    pipeline folder (`save_pretrained` layout) or a hub id where a hub is reachable. None builds a
    tiny seeded random-weight model from configs (the embedded default)."""
    init_seed: int = 0
    """Seed of the random weights when `weights` is None."""
    psi: float = 0.7
    """Truncation: w = w_avg + psi * (w - w_avg). 1.0 is no truncation."""
    rgb_taps: bool = True
    """Also feed each block's running skip-RGB image (StyleGAN2's toRGB outputs) to the decoder,
    besides every conv layer's features."""
    batch_invariant: bool = True
    """Run the generator one seed at a time, so a sample's bytes never depend on its batch-mates:
    regenerating any single seed reproduces it bit for bit. False batches the generator for
    throughput; re-running a shard still reproduces it (same batches), a lone seed may differ by
    one grey level in a few pixels."""
    stylegan2: StyleGAN2Config = field(default_factory=lambda: StyleGAN2Config(channel_max=8))
    """Architecture of the random-weight generator; with `weights` set, the file's stored
    architecture is used instead."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Sampler and feature taps of the diffusion backbone."""

    def __post_init__(self) -> None:
        if self.kind not in ("stylegan2", "diffusion"):
            raise ConfigError(f"backbone.kind must be 'stylegan2' or 'diffusion', got {self.kind!r}")
        if not 0.0 <= self.psi <= 2.0:
            raise ConfigError(f"backbone.psi must be in [0, 2], got {self.psi}")


DECODER_TASKS = {"interpreter": ("segmentation", "keypoints"),
                 "perception": ("segmentation", "instances", "depth", "keypoints")}


@dataclass
class DecoderConfig:
    kind: str = "interpreter"
    """Which decoder: "interpreter" (DatasetGAN's Style Interpreter, an ensemble of pixel MLPs) or
    "perception" (DatasetDM's P-decoder: multi-scale fusion and task heads)."""
    task: str = "segmentation"
    """interpreter: "segmentation" (one class per pixel) or "keypoints" (one heatmap per keypoint)."""
    tasks: list[str] = field(default_factory=lambda: ["segmentation", "depth"])
    """perception: any of "segmentation" (all classes in one pass), "instances" (query-based masks),
    "depth" (SILog), "keypoints" (heatmaps), fitted together on shared features."""
    num_heads: int = 10
    """Ensemble size (interpreter heads; perception semantic heads); disagreement between heads is
    the uncertainty score."""
    hidden: list[int] | None = None
    """interpreter: hidden widths; None means the paper's (128, 32), or (256, 128) with >= 32 outputs."""
    dim: int = 64
    """perception: channels of the fused features and the instance queries (the paper uses 256)."""
    num_queries: int = 16
    """perception: instance queries, the most instances one image can hold."""
    num_layers: int = 2
    """perception: query-decoder layers (masked cross-attention, self-attention, FFN)."""
    instance_threshold: float = 0.5
    """perception: class confidence a query needs to become an instance."""
    init_seed: int = 0
    """Seed of the initial weights (each head differs)."""
    heatmap_sigma: float = 2.0
    """Keypoints: standard deviation in pixels of the Gaussian regressed around each keypoint."""
    uncertainty_top_fraction: float = 0.1
    """A sample's score is the mean uncertainty of its most uncertain pixels, this fraction of them."""

    def __post_init__(self) -> None:
        if self.kind not in DECODER_TASKS:
            raise ConfigError(f"decoder.kind must be 'interpreter' or 'perception', got {self.kind!r}")
        if self.task not in DECODER_TASKS["interpreter"]:
            raise ConfigError(f"decoder.task must be 'segmentation' or 'keypoints', got {self.task!r}")
        tasks = list(self.tasks)
        bad = [t for t in tasks if t not in DECODER_TASKS["perception"]]
        if not tasks or bad or len(set(tasks)) != len(tasks):
            raise ConfigError(f"decoder.tasks must list some of {DECODER_TASKS['perception']} once each, got {tasks}")
        if self.num_heads < 1:
            raise ConfigError(f"decoder.num_heads must be >= 1, got {self.num_heads}")
        if self.hidden is not None and (len(self.hidden) != 2 or min(self.hidden) < 1):
            raise ConfigError(f"decoder.hidden must be two positive widths, got {self.hidden}")
        for key in ("dim", "num_queries", "num_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"decoder.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_queries > 255:
            raise ConfigError(f"decoder.num_queries must be <= 255 (instance ids are 8-bit), got {self.num_queries}")
        if not 0.0 < self.instance_threshold < 1.0:
            raise ConfigError(f"decoder.instance_threshold must be in (0, 1), got {self.instance_threshold}")
        if not 0.0 < self.uncertainty_top_fraction <= 1.0:
            raise ConfigError(
                f"decoder.uncertainty_top_fraction must be in (0, 1], got {self.uncertainty_top_fraction}"
            )
        if self.heatmap_sigma <= 0:
            raise ConfigError(f"decoder.heatmap_sigma must be > 0, got {self.heatmap_sigma}")

    def active_tasks(self) -> list[str]:
        """What this decoder predicts."""
        return [self.task] if self.kind == "interpreter" else list(self.tasks)


@dataclass
class LabelsConfig:
    classes: list[str] = field(default_factory=lambda: ["background", "blue"])
    """Segmentation classes; the index in this list is the pixel value in mask PNGs. The default is
    the colour rule of random-weight backbones (`factory.annotator.color_annotator`); the demo uses
    the toy world's parts."""
    keypoints: list[str] = field(default_factory=list)
    """Keypoint names, in the order of COCO's `keypoints` triplets (keypoints task only)."""
    dir: str | None = None
    """A folder of real labeled images (images/, masks/, depth/, instances.json, prompts.jsonl; see
    the README) that `factory labels import` validates into `train.labeled` (diffusion path)."""
    depth_scale: float = 1000.0
    """Depth PNGs (16-bit) hold metres x depth_scale (1000: millimetres, as NYU and most sensors);
    0 means unknown. Used for imported real depth and for the depth PNGs a build writes."""

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(self.classes) > 255:
            raise ConfigError(f"labels.classes must list 2-255 classes, got {len(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"labels.classes has duplicates: {self.classes}")
        if self.depth_scale <= 0:
            raise ConfigError(f"labels.depth_scale must be > 0, got {self.depth_scale}")


@dataclass
class AnnotateConfig:
    dir: str = "${workdir}/annotations"
    """Folder handed to annotators: generated images, their seeds/latents, and the labels they add."""
    num_images: int = 16
    """How many generated images to export for labeling (the paper labels 16-30)."""
    start_seed: int = 0
    """Seeds start_seed .. start_seed + num_images - 1 are exported."""

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ConfigError(f"annotate.num_images must be >= 1, got {self.num_images}")


@dataclass
class TrainConfig:
    labeled: str = "${annotate.dir}/labeled.safetensors"
    """The labeled set written by `factory annotate import` (GAN path) or `factory labels import`
    (real images, diffusion path)."""
    storage_path: str = "${workdir}/train"
    """Where Ray Train keeps checkpoints; the fitted decoder lands in <storage_path>/<run_name>/decoder."""
    run_name: str = "interpreter"
    """Ray Train run name; re-running with the same name resumes from its last checkpoint."""
    num_workers: int = 2
    """Data-parallel workers (DDP; gloo on CPU, nccl on GPU)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per worker; fractional values let workers share a small machine."""
    steps: int = 400
    """Optimizer steps."""
    batch_pixels: int = 64
    """interpreter: pixels per head per step per worker (the paper's batch is 64)."""
    batch_images: int = 4
    """perception: labeled images per step per worker."""
    lr: float = 1e-3
    """Adam learning rate."""
    class_balanced: bool = True
    """Sample pixels uniformly over classes first, so small parts are seen as often as background."""
    val_images: int = 4
    """Labeled images held out for validation (the last ones by seed); 0 disables validation."""
    checkpoint_every: int = 100
    """Steps between checkpoints (and validation reports)."""
    seed: int = 0
    """Seed of the pixel sampling; a step's pixels are a function of (seed, rank, step)."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""

    def __post_init__(self) -> None:
        for key in ("num_workers", "steps", "batch_pixels", "batch_images", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.val_images < 0:
            raise ConfigError(f"train.val_images must be >= 0, got {self.val_images}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass
class GenerateConfig:
    decoder: str = "${train.storage_path}/${train.run_name}/decoder"
    """Folder of the fitted decoder (written by `factory train`); a local path or any fsspec URL."""
    output: str = "${workdir}/dataset"
    """Dataset root, a local path or any fsspec URL (s3://bucket/prefix); layout in the README."""
    formats: list[str] = field(default_factory=lambda: ["parquet"])
    """Shard formats to write, one or both of "parquet" and "webdataset"."""
    num_samples: int = 1000
    """Seeds to generate, from `start_seed` on; filtering keeps about (1 - drop_uncertain) of them."""
    start_seed: int = 1_000_000
    """First seed; kept apart from the annotation seeds so no labeled image is regenerated."""
    shard_size: int = 1000
    """Seeds per shard (the unit of work and of resume). 1,000 gives shards of about 100 MB at
    256 px and 400 MB at 512 px."""
    batch_size: int = 16
    """Seeds per backbone + decoder forward pass."""
    drop_uncertain: float = 0.1
    """Fraction of samples to drop as most uncertain (the paper drops 10%); 0 keeps everything."""
    calibration_samples: int = 1000
    """Seeds scored before the build to fix the drop threshold (the build's first seeds)."""
    num_actors: int = 2
    """Actors in the Ray Data pool; each loads the backbone and decoder once."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (fractional values share cores)."""
    gpus_per_actor: float = 0.0
    """GPUs per actor; > 0 runs the models on CUDA."""
    max_retries: int = 3
    """Retries of a failed shard (an exception in the actor), and restarts of a crashed actor
    with its shard resubmitted, before the shard is reported failed."""
    overwrite: bool = False
    """Replace a dataset that was built from a different config instead of refusing."""

    def __post_init__(self) -> None:
        for key in ("num_samples", "shard_size", "batch_size", "num_actors", "calibration_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"generate.{key} must be >= 1, got {getattr(self, key)}")
        if self.start_seed < 0:
            raise ConfigError(f"generate.start_seed must be >= 0, got {self.start_seed}")
        if self.max_retries < 0:
            raise ConfigError(f"generate.max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.drop_uncertain < 1:
            raise ConfigError(f"generate.drop_uncertain must be in [0, 1), got {self.drop_uncertain}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ConfigError(
                f"generate.cpus_per_actor must be > 0 and generate.gpus_per_actor >= 0, "
                f"got {self.cpus_per_actor} and {self.gpus_per_actor}"
            )
        formats = list(self.formats)
        unknown = [f for f in formats if f not in ("parquet", "webdataset")]
        if not formats or unknown or len(set(formats)) != len(formats):
            raise ConfigError(
                f"generate.formats must list 'parquet' and/or 'webdataset' once each, got {formats}"
            )


@dataclass
class PromptsConfig:
    """Where a diffusion build's prompts come from. The resolved prompts are written next to the
    dataset (`<generate.output>/prompts.jsonl`) and the build reads that file, so a build is
    reproducible from its own folder. Sample i (counting from generate.start_seed) uses prompt
    i mod (number of prompts)."""

    source: str | None = None
    """A prompt file: .txt (one per line), .jsonl or .parquet (a `prompt` column, optional
    `classes`). None expands `template` (or asks `endpoint`, if set)."""
    template: str = "a photo of a {class}"
    """Used when `source` is None: `{class}` and one `{name}` per entry of `attributes`."""
    attributes: dict[str, list[str]] = field(default_factory=dict)
    """Attribute lists for `template`, e.g. {style: [photo, painting]}; every combination is used."""
    seed: int = 0
    """Shuffles template combinations (and seeds the endpoint's sampling)."""
    endpoint: str | None = None
    """Base URL of an OpenAI-compatible chat API (e.g. http://localhost:8000/v1). When set (and
    `source` is None) prompts are written by the model once per dataset, never per sample."""
    model: str = "gpt-4o-mini"
    """Chat model name sent to `endpoint`."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's key (never put keys in config files)."""
    num_prompts: int = 100
    """Prompts to ask `endpoint` for."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"prompts.num_prompts must be >= 1, got {self.num_prompts}")


@dataclass
class PretrainConfig:
    """Training a backbone itself on a folder of images (`factory pretrain`). The kind trained is
    `backbone.kind`; training starts from the seeded random weights `backbone.weights: null` would
    build (`backbone.init_seed`; the architecture of `backbone.stylegan2`, or the tiny diffusion
    pipeline), whatever `backbone.weights` says, so a config may point `backbone.weights` at
    `pretrain.output` and serve the rest of the pipeline unchanged."""

    images: str | None = None
    """Folder of training images (.png, .jpg, .jpeg, .webp), directly inside it or under images/ (the
    labeled-folder layout). An optional prompts.jsonl beside them ({"file": NAME, "prompt": ...})
    conditions the diffusion model; images without a row get the empty prompt. Images are resized on
    their short side and centre-cropped to the backbone's resolution."""
    output: str | None = None
    """Where the trained weights are published (a local path, which `backbone.weights` loads):
    stylegan2, a .safetensors file (its record beside it as <name>.json); diffusion, a
    `save_pretrained` pipeline folder (its record inside as pretrain.json)."""
    steps: int = 2000
    """Optimizer steps: generator + discriminator steps (stylegan2) or UNet steps after the VAE's
    `vae_steps` (diffusion)."""
    batch_size: int = 16
    """Images per step per worker."""
    lr: float = 0.002
    """Adam learning rate (both networks; the StyleGAN2 mapping network's is scaled by
    `backbone.stylegan2.mapping_lr_multiplier`)."""
    seed: int = 0
    """Seeds every draw of the run (batches, latents, noise, timesteps, prompt dropout): a step's
    draws are a function of (seed, rank, step), so a resumed run draws what it would have."""
    checkpoint_every: int = 500
    """Steps between checkpoints and loss reports."""
    num_workers: int = 1
    """Data-parallel workers (gloo on CPU, nccl on GPU); the effective batch is num_workers x batch_size."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; fractional values let workers share a small machine."""
    run_name: str = "pretrain"
    """Ray Train run name; re-running with the same name resumes from its last checkpoint."""
    storage_path: str = "${workdir}/pretrain"
    """Where Ray Train keeps checkpoints (a local path or any fsspec URL)."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    flip: bool = True
    """stylegan2: mirror each real image left-right with probability 1/2."""
    r1_gamma: float = 0.1
    """stylegan2: weight of the R1 penalty, gamma/2 E[|grad D(real)|^2] (stylegan2-ada's heuristic
    0.0002 x resolution^2 / batch gives ~0.05 at 64 px, batch 16)."""
    r1_every: int = 16
    """stylegan2: lazy regularization, R1 every this many steps, scaled up to match (paper: 16)."""
    ema_half_life: float = 2000.0
    """stylegan2: images (over all workers) after which an old weight's share in the published EMA
    generator halves; ramped up from 0 as 5% of the images seen so far, as in stylegan2-ada."""
    vae_steps: int = 1000
    """diffusion: steps training the VAE alone (L1 reconstruction + kl_weight x KL) before the UNet."""
    kl_weight: float = 1e-5
    """diffusion: weight of the VAE's KL term against the reconstruction loss."""
    prompt_dropout: float = 0.1
    """diffusion: probability of training on the empty prompt instead of the image's, so
    classifier-free guidance has an unconditional model to push away from."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "num_workers", "r1_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"pretrain.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("vae_steps", "max_failures"):
            if getattr(self, key) < 0:
                raise ConfigError(f"pretrain.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "cpus_per_worker", "ema_half_life"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"pretrain.{key} must be > 0, got {getattr(self, key)}")
        for key in ("r1_gamma", "kl_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"pretrain.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"pretrain.prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.output is not None and "://" in self.output:
            raise ConfigError(f"pretrain.output must be a local path (backbones load local weights), got {self.output}")


@dataclass
class NightlyConfig:
    root: str = "${workdir}/datasets"
    """Dataset root: each night's build is <root>/<YYYY-MM-DD>, and <root>/LATEST names the newest
    version that validated. Consumers read `<root>@latest`."""
    keep: int = 7
    """Versions kept; older ones are deleted after a successful night (never the one LATEST names)."""
    min_samples: int = 1
    """Validation: fewer kept samples than this fails the night and leaves LATEST where it was."""
    verify_checksums: bool = True
    """Validation: re-read every shard file and compare its sha256 with the completion record."""
    label_samples: int = 200
    """Validation: samples whose labels are checked (ids within the label set, not all background)."""

    def __post_init__(self) -> None:
        for key in ("keep", "min_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"nightly.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class FactoryConfig:
    name: str = "demo"
    """A name for this factory, recorded in checkpoints and manifests."""
    workdir: str = "factory-work"
    """Base folder the default paths below are relative to."""
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def label_names(self) -> list[str]:
        """What the decoder predicts: the classes (segmentation) or the keypoint names."""
        if self.decoder.kind == "perception":
            return self.labels.classes
        return self.labels.classes if self.decoder.task == "segmentation" else self.labels.keypoints

    def __post_init__(self) -> None:
        if "keypoints" in self.decoder.active_tasks() and not self.labels.keypoints:
            raise ConfigError("labels.keypoints must name the keypoints when the decoder predicts keypoints")
        if self.backbone.kind == "diffusion" and self.decoder.kind != "perception":
            raise ConfigError("backbone.kind 'diffusion' needs decoder.kind 'perception' (its features are "
                              "multi-scale maps fitted on real images)")
        if self.backbone.kind == "stylegan2" and self.decoder.kind != "interpreter":
            raise ConfigError("backbone.kind 'stylegan2' needs decoder.kind 'interpreter' (the perception "
                              "decoder is fitted on inverted real images, which needs a diffusion backbone)")
        if (self.backbone.kind == "stylegan2" and self.pretrain.output is not None
                and not self.pretrain.output.endswith(".safetensors")):
            raise ConfigError(f"pretrain.output must name a .safetensors file for backbone.kind 'stylegan2', "
                              f"got {self.pretrain.output}")
        if self.backbone.kind == "stylegan2" and self.train.val_images >= self.annotate.num_images:
            raise ConfigError(
                f"train.val_images ({self.train.val_images}) must be smaller than "
                f"annotate.num_images ({self.annotate.num_images})"
            )


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FactoryConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated, interpolations resolved."""
    merged = OmegaConf.structured(FactoryConfig)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad[0]!r}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)  # runs every __post_init__
    except yaml.YAMLError as e:
        raise ConfigError(f"override is not valid YAML: {' '.join(str(e).split())}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"override: {_describe(e)}" if overrides else _describe(e)) from None
    return absolute_paths(cfg)


PATH_KEYS = ("backbone.weights", "labels.dir", "prompts.source", "annotate.dir", "train.labeled", "train.storage_path", "generate.decoder",
             "generate.output", "nightly.root", "pretrain.images", "pretrain.output", "pretrain.storage_path")


SHIPPED = "pkg://"
"""`backbone.weights: pkg://NAME` names weights shipped with the package, in factory/weights/."""
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def shipped_path(value: str) -> str:
    """The local path of `pkg://NAME`; ConfigError naming what is shipped if NAME is not."""
    path = os.path.join(SHIPPED_DIR, value[len(SHIPPED):])
    if not value[len(SHIPPED):] or not os.path.exists(path):
        have = sorted(n for n in os.listdir(SHIPPED_DIR) if not n.endswith(".json")) if os.path.isdir(SHIPPED_DIR) else []
        raise ConfigError(f"backbone.weights={value}: no such shipped weights (shipped: {have})")
    return path


def absolute_paths(cfg: FactoryConfig) -> FactoryConfig:
    """Local paths made absolute, so Ray workers (which run elsewhere) see the same files; shipped
    weights (`pkg://NAME`) resolved to their place in the installed package."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key == "backbone.weights" and value is not None and value.startswith(SHIPPED):
            cfg.backbone.weights = shipped_path(value)
            continue
        if key == "backbone.weights" and value is not None and not os.path.exists(value):
            continue  # maybe a hub id ("org/model"); loading names it if it is neither
        if value is not None and "://" not in value:
            setattr(getattr(cfg, section), name, os.path.abspath(value))
    return cfg


def from_dict(data: dict) -> FactoryConfig:
    """Rebuild a config shipped across processes (e.g. to Ray workers) as a plain dict."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FactoryConfig), data))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None


def to_dict(cfg: FactoryConfig) -> dict:
    return asdict(cfg)


def to_yaml(cfg: FactoryConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def stable_hash(obj: object) -> str:
    """sha256 of a JSON-able object in canonical form: equal settings give equal hashes everywhere."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _describe(e: OmegaConfBaseException) -> str:
    first = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    if key and key not in first:
        return f"{first} (key: {key})"
    return first
