"""Settings of the stages: where Ray and storage are, and how annotation, training, generation,
prompts, backbone pretraining and nightly builds run."""

from __future__ import annotations

from dataclasses import dataclass, field

from factory.config.checks import (
    ConfigError,
    at_least,
    distinct_subset,
    no_credentials,
    one_of,
    positive,
    seeds_fit,
    within,
)


@dataclass
class RayConfig:
    address: str | None = None
    """Cluster to join ("auto", "ray://head:10001"). None joins the job's cluster when run by
    `ray job submit` (RAY_ADDRESS is set), else starts a local cluster in this process."""
    num_cpus: int | None = 4
    """Logical CPUs of a local cluster. More than the physical cores lets fractional actors and
    Ray Train's controller share a 2-core machine without deadlock. Ignored when joining a cluster."""
    dashboard: bool | None = None
    """Start Ray's dashboard (http://127.0.0.1:8265) with a local cluster. None (default): only for
    the commands that fit on Ray Train (`train`, `pretrain`, `demo`, the train/pretrain/nightly jobs),
    whose controller watches itself through the State API the dashboard serves (without it Ray Train
    cannot clean up after a dead controller and warns every few seconds); off for builds, where its
    11 processes would hold about 0.9 GB and slow the cluster's start by seconds on a small machine.
    Ignored when joining a cluster (its head decides)."""
    train_start_timeout_s: float = 300.0
    """Seconds Ray Train waits for a fit's workers to be placed and started before it fails the
    attempt (Ray's own default is 60 s, which a busy small machine or a cluster scaling up for the
    workers can exceed). A cluster short of the resources is still refused at once. An environment
    variable RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S that is already set wins."""

    def __post_init__(self) -> None:
        positive("ray", self, ("train_start_timeout_s",))
        if self.num_cpus is not None:
            at_least("ray", self, 1, ("num_cpus",))


@dataclass
class StorageConfig:
    endpoint_url: str | None = None
    """S3 endpoint for s3:// URLs (MinIO, on-prem, a local test server); None means AWS itself."""
    region: str | None = None
    """S3 region; None lets the AWS credential chain decide."""
    anonymous: bool = False
    """Access public buckets without credentials. Otherwise credentials come from the standard AWS
    chain (environment, profile, instance or pod role), never from config files."""

    def __post_init__(self) -> None:
        no_credentials("storage.endpoint_url", self.endpoint_url)


@dataclass
class AnnotateConfig:
    dir: str = "${workdir}/annotations"
    """Folder handed to annotators: generated images, their seeds/latents, and the labels they add."""
    num_images: int = 16
    """How many generated images to export for labeling (the paper labels 16-30)."""
    start_seed: int = 0
    """Seeds start_seed .. start_seed + num_images - 1 are exported."""
    batch_size: int = 16
    """Seeds per forward pass when exporting; recorded in export.json, so training regenerates every
    labeled image in the very batch it was exported in (see `backbone.batch_invariant`)."""
    latents: str | None = None
    """A .npy of your own latents, one row per image ([N, z_dim] for z; [N, w_dim], or [N, num_ws,
    w_dim] with equal rows, for w): export renders these instead of seeds' latents, so images already
    labeled with another tool come in with their latents. Image i gets seed start_seed + i (its noise
    with `backbone.noise: seed`, its class); all N rows are exported and num_images is not used."""
    latent_space: str = "z"
    """What `latents` holds: "z" (mapped and truncated with backbone.psi, like a seed's z) or "w"
    (used as is, e.g. a projector's output)."""
    pool_start_seed: int = 100_000
    """`annotate suggest` (GAN path): candidate seeds are pool_start_seed .. pool_start_seed + pool_size - 1
    (apart from the first round's seeds and from generate.start_seed's)."""
    pool_size: int = 1000
    """`annotate suggest`: candidates scored with the fitted decoder (seeds, or the first images of
    `candidates`); `--pool` overrides it."""
    candidates: str | None = None
    """`annotate suggest` (diffusion path): a folder of unlabeled real photos to choose from; the
    chosen ones are copied into labels.dir/images/ for annotators."""

    def __post_init__(self) -> None:
        at_least("annotate", self, 1, ("num_images", "batch_size", "pool_size"))
        seeds_fit("annotate", "start_seed", self.start_seed, "num_images", self.num_images)
        seeds_fit("annotate", "pool_start_seed", self.pool_start_seed, "pool_size", self.pool_size)
        if self.latent_space not in ("z", "w"):
            raise ConfigError(f"annotate.latent_space must be 'z' or 'w', got {self.latent_space!r}")


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
    """Adam learning rate (the peak, with a schedule)."""
    lr_schedule: str = "cosine"
    """"cosine" decays the learning rate to 0 at `steps` (half a cosine), so the last steps settle
    instead of bouncing between the few labeled images' minima; "constant" keeps `lr` throughout."""
    class_balanced: bool = True
    """Sample pixels uniformly over classes first, so small parts are seen as often as background."""
    val_images: int = 4
    """Labeled images held out for validation (the last ones by seed); 0 disables validation."""
    flip: bool = False
    """perception: also train on every training image mirrored left to right, inverted on its own
    (twice the labeled images; the validation images stay as they are). Only where no class tells left
    from right; keypoints whose names differ by the word "left"/"right" swap with their partner."""
    inversion_draws: int = 1
    """perception: noise draws each training image is inverted under, each a different noisy view of
    it as generation's fresh noise per seed gives (features in memory x draws; validation uses one)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (and validation reports)."""
    seed: int = 0
    """Seed of the pixel sampling; a step's pixels are a function of (seed, rank, step)."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""

    def __post_init__(self) -> None:
        at_least("train", self, 1, ("num_workers", "steps", "batch_pixels", "batch_images", "checkpoint_every",
                                    "inversion_draws"))
        at_least("train", self, 0, ("val_images", "seed", "max_failures"))
        positive("train", self, ("lr", "cpus_per_worker"))
        one_of("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))


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
    lease_seconds: float = 60.0
    """Life of the build's lease on its output (`<output>/_lease.json`, renewed every third of it): a
    second build into the same output is refused while it lives; a crashed build's lease is taken over
    once it expires (at once when the crashed driver ran on the same host)."""
    image_format: str = "png"
    """Codec of the generated images: "png" (lossless), or "webp"/"jpeg" where a lossy image is
    acceptable (`image_quality`). Masks, depth and instance maps are always PNG."""
    image_quality: int = 95
    """webp/jpeg quality, 1-100."""
    png_compression: int = 1
    """zlib level (0-9) of every PNG written: 1 is several times faster than 6 for a few % more bytes."""
    encode_threads: int = 2
    """Threads per actor that encode and write samples while the model computes the next batch."""
    compile: bool = False
    """`torch.compile` the backbone's network in each actor (the first batch then takes the compile
    time). Part of the samples' identity, as it may change their last float bits: an output built
    with it is resumed only with it. Measured in benchmarks/generate.py --variants and benchmarks/gpu.py."""
    channels_last: bool = False
    """Run the backbone's convolutions in channels-last memory format (faster convs on recent GPUs).
    Part of the samples' identity, like `compile`."""

    def __post_init__(self) -> None:
        at_least("generate", self, 1, ("num_samples", "shard_size", "batch_size", "num_actors", "calibration_samples"))
        at_least("generate", self, 0, ("max_retries", "gpus_per_actor"))
        seeds_fit("generate", "start_seed", self.start_seed, "num_samples", self.num_samples)
        within("generate.drop_uncertain", self.drop_uncertain, 0, 1, open_high=True)
        positive("generate", self, ("cpus_per_actor", "lease_seconds"))
        distinct_subset("generate.formats", list(self.formats), ("parquet", "webdataset"))
        one_of("generate.image_format", self.image_format, ("png", "webp", "jpeg"))
        within("generate.image_quality", self.image_quality, 1, 100)
        within("generate.png_compression", self.png_compression, 0, 9)
        at_least("generate", self, 1, ("encode_threads",))


@dataclass
class CardConfig:
    """The dataset card (`README.md`) every finished build writes at its root, in the Hugging Face
    dataset-card format."""

    weights_license: str | None = None
    """Licence of the backbone weights that made the data (e.g. "apache-2.0", "mit",
    "nvidia-source-code-license-nc"); the card repeats it, since the data inherits its terms. None:
    unknown, with a warning at build time (the shipped toy weights are known: apache-2.0; weights
    from NVIDIA's official pickles are recognised and called non-commercial whatever is set here)."""
    license: str | None = None
    """The dataset's own licence id for the card's front matter; None derives it from the weights'
    ("other" for non-commercial NVIDIA weights, "unknown" when the weights' licence is unknown)."""
    stat_samples: int = 1000
    """Samples read for the card's per-class pixel frequencies."""
    preview_samples: int = 16
    """Samples drawn in the card's preview image (preview.png beside it)."""

    def __post_init__(self) -> None:
        at_least("card", self, 1, ("stat_samples", "preview_samples"))


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
        at_least("prompts", self, 1, ("num_prompts",))
        at_least("prompts", self, 0, ("seed",))
        no_credentials("prompts.endpoint", self.endpoint)
        for name, values in self.attributes.items():  # a repeat doubles prompts; an empty value reads "with  hair"
            if any(not str(v).strip() for v in values):
                raise ConfigError(f"prompts.attributes.{name} holds an empty value: {list(values)}")
            twice = [v for i, v in enumerate(values) if v in list(values)[:i]]
            if twice:
                raise ConfigError(f"prompts.attributes.{name} lists {twice[0]!r} twice: {list(values)}")


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
    """Images (over all workers) after which an old weight's share in the published EMA halves;
    ramped up from 0 as 5% of the images seen so far, as in stylegan2-ada. stylegan2: the generator's
    EMA, always published; diffusion: the denoiser's, with `denoiser_ema`."""
    denoiser_ema: bool = False
    """diffusion (sd, sd3): publish an exponential moving average of the denoiser (UNet or MM-DiT;
    `ema_half_life`, counted from the denoiser's first step) instead of its last weights, as diffusion
    models are usually released. A constant learning rate leaves the last weights noisy: on the toy
    pipeline two checkpoints 1,000 steps apart generated images at KID 0.016 and 0.008. Off by default
    so earlier configs train what they trained; a checkpoint resumes only with the same setting."""
    lr_decay_steps: int = 0
    """The run's last this many steps decay the learning rate linearly to zero (the denoiser's steps
    for diffusion, the VAE's keep `lr`; both networks' for stylegan2); 0 keeps it constant. The steps
    before the decay train exactly as a constant-rate run, so a finished run is continued with a decay
    by raising `steps` and setting this to the added steps: it resumes from its last checkpoint. A
    checkpoint resumes only where its steps would have had the same rates (else refused, naming
    both schedules). On the toy pipeline: see README, Training your own backbone."""
    lr_restarts: list[int] = field(default_factory=list)
    """Steps at which the learning rate returns to `lr` and a new cycle starts, each cycle ending
    with its own `lr_decay_steps` decay (warm restarts): a run that finished its decay at step S is
    extended by a new cycle with `steps` raised and `lr_restarts: [S]`, resuming from its last
    checkpoint. Empty (the default): one cycle, the whole run. Needs `lr_decay_steps`."""
    vae_steps: int = 1000
    """diffusion: steps training the VAE alone (L1 reconstruction + kl_weight x KL) before the UNet."""
    kl_weight: float = 1e-5
    """diffusion: weight of the VAE's KL term against the reconstruction loss."""
    prompt_dropout: float = 0.1
    """diffusion: probability of training on the empty prompt instead of the image's, so
    classifier-free guidance has an unconditional model to push away from."""
    family: str = "sd"
    """diffusion: the pipeline family trained (its tiny architecture, `backbone.init_seed`'s weights):
    "sd", a StableDiffusionPipeline (VAE, then a UNet learning the scheduler's DDPM prediction), or
    "sd3", a StableDiffusion3Pipeline (an MM-DiT `SD3Transformer2DModel` learning flow matching,
    frozen seeded CLIP x2 + T5 text encoders; needs `vae_from`). Loading the result reads the family
    from its model_index.json, as for any pipeline folder."""
    vae_from: str | None = None
    """diffusion: a pipeline folder (or `pkg://NAME`) whose trained VAE is reused, frozen with its
    `scaling_factor`: no VAE phase (`vae_steps` must be 0), only the denoiser trains."""
    dit_layers: int = 4
    """sd3: joint transformer blocks of the MM-DiT."""
    dit_heads: int = 4
    """sd3: attention heads per block; the hidden width is dit_heads x dit_head_dim."""
    dit_head_dim: int = 16
    """sd3: channels per attention head."""
    dit_patch: int = 2
    """sd3: latent pixels per image token side (the latent side must be a multiple of it)."""
    flow_shift: float = 1.0
    """sd3: the `shift` of the pipeline's FlowMatchEulerDiscreteScheduler (training sigmas and
    sampling schedule: sigma' = shift sigma / (1 + (shift - 1) sigma)); SD3 uses 3.0 at 1024 px,
    small latent grids want less."""

    def __post_init__(self) -> None:
        at_least("pretrain", self, 1, ("steps", "batch_size", "checkpoint_every", "num_workers", "r1_every"))
        at_least("pretrain", self, 0, ("vae_steps", "max_failures", "r1_gamma", "kl_weight", "seed"))
        positive("pretrain", self, ("lr", "cpus_per_worker", "ema_half_life"))
        within("pretrain.prompt_dropout", self.prompt_dropout, 0.0, 1.0, open_high=True)
        at_least("pretrain", self, 0, ("lr_decay_steps",))
        if self.lr_decay_steps > self.steps:
            raise ConfigError(f"pretrain.lr_decay_steps={self.lr_decay_steps} is more than pretrain.steps={self.steps}: "
                              "the decay runs over the last steps of the run (the denoiser's, for diffusion)")
        if self.lr_restarts and not self.lr_decay_steps:
            raise ConfigError(f"pretrain.lr_restarts={self.lr_restarts} needs pretrain.lr_decay_steps > 0: a restart "
                              "starts a new cycle after a finished decay")
        for before, at in zip([0, *self.lr_restarts], self.lr_restarts):
            if not isinstance(at, int) or isinstance(at, bool) or at <= before:
                raise ConfigError(f"pretrain.lr_restarts={self.lr_restarts}: restarts are increasing steps after 0, "
                                  f"got {at!r} after {before}")
        if self.lr_restarts and self.lr_restarts[-1] >= self.steps + self.vae_steps:  # `pretrain` checks its kind's
            raise ConfigError(f"pretrain.lr_restarts={self.lr_restarts}: the last restart must come before the run's "
                              f"last step (pretrain.steps={self.steps}, plus pretrain.vae_steps={self.vae_steps} for "
                              "the SD family)")
        at_least("pretrain", self, 1, ("dit_layers", "dit_heads", "dit_head_dim", "dit_patch"))
        positive("pretrain", self, ("flow_shift",))
        if self.family not in ("sd", "sd3"):
            raise ConfigError(f"pretrain.family must be 'sd' or 'sd3', got {self.family!r}")
        if self.vae_from is not None and self.vae_steps:
            raise ConfigError(f"pretrain.vae_steps={self.vae_steps} but pretrain.vae_from={self.vae_from} reuses a "
                              "trained VAE: set pretrain.vae_steps to 0")
        if self.family == "sd3" and self.vae_from is None:
            raise ConfigError("pretrain.family=sd3 trains the transformer only: set pretrain.vae_from to a pipeline "
                              "folder whose VAE it reuses (e.g. pkg://toy_diffusion)")
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
    """Validation: samples whose labels are checked (ids within the label set, not all background);
    0 checks none."""

    def __post_init__(self) -> None:
        at_least("nightly", self, 1, ("keep", "min_samples"))
        at_least("nightly", self, 0, ("label_samples",))
