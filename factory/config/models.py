"""Settings of the models: which backbone (and its architecture or sampler), which decoder, which labels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from factory.config.checks import ConfigError, at_least, distinct_subset, finite, one_of, positive, within


@dataclass
class StyleGAN2Config:
    """The StyleGAN2 generator's architecture (`backbone.stylegan2`), stored in every weights file."""

    resolution: int = 32
    """Output side in pixels; blocks run at 4, 8, ..., resolution."""
    z_dim: int = 64
    """Latent z size."""
    w_dim: int = 64
    """Intermediate latent w size (mapping width and style input)."""
    mapping_layers: int = 2
    """Fully connected layers in the mapping network (8 in the paper)."""
    channel_base: int = 1024
    """Channels at resolution r are min(channel_base // r, channel_max), as in stylegan2-ada-pytorch,
    so official configs carry over verbatim. 1024 / 64 gives 64, 64, 64, 32 channels at 4..32."""
    channel_max: int = 64
    """Cap on channels per layer (512 in the paper)."""
    img_channels: int = 3
    """Channels of the output image."""
    mapping_lr_multiplier: float = 0.01
    """Equalized-lr multiplier of the mapping layers; only shapes how weights are stored."""
    w_avg_beta: float = 0.995
    """EMA decay for tracking w_avg while training; unused at inference."""
    c_dim: int = 0
    """Class labels of a class-conditional generator (its `mapping.embed` takes a one-hot class);
    0 is unconditional. A conditional generator needs `backbone.classes`."""
    conv_clamp: float | None = None
    """Clamp every synthesis layer's and toRGB's output to +-conv_clamp, where the official network
    does (after bias, activation and gain). Official training sets 256 unless `--fp32`; None: no clamp."""
    num_fp16_res: int = 0
    """The highest-resolution blocks the checkpoint ran in float16 (official training: 4). They run
    in `backbone.dtype` on CUDA and in float32 elsewhere; 0 runs every block in float32."""

    def __post_init__(self) -> None:
        for name in ("resolution", "z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max",
                     "img_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"backbone.stylegan2.{name} must be a positive integer, got {value!r}")
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ConfigError(f"backbone.stylegan2.resolution must be a power of two >= 8, got {r}")
        if self.channel_base < r:
            raise ConfigError(f"backbone.stylegan2.channel_base must be >= resolution ({r}) so every block "
                              f"has a channel, got {self.channel_base}")
        lr = self.mapping_lr_multiplier
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"backbone.stylegan2.mapping_lr_multiplier must be > 0, got {lr!r}")
        finite("backbone.stylegan2.mapping_lr_multiplier", lr)
        beta = self.w_avg_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ConfigError(f"backbone.stylegan2.w_avg_beta must be in [0, 1], got {beta!r}")
        for name in ("c_dim", "num_fp16_res"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"backbone.stylegan2.{name} must be an integer >= 0, got {value!r}")
        clamp = self.conv_clamp
        if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0):
            raise ConfigError(f"backbone.stylegan2.conv_clamp must be > 0 or null, got {clamp!r}")
        if clamp is not None:
            finite("backbone.stylegan2.conv_clamp", clamp)

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    @property
    def block_resolutions(self) -> list[int]:
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    @property
    def fp16_resolutions(self) -> list[int]:
        """Blocks that ran in float16 in the checkpoint (the official network's rule)."""
        if self.num_fp16_res == 0:
            return []
        lowest = max(2 ** (int(math.log2(self.resolution)) + 1 - self.num_fp16_res), 8)
        return [r for r in self.block_resolutions if r >= lowest]


SCHEDULERS = ("auto", "ddim", "euler", "euler_a", "dpmsolver++", "lcm", "flow_euler")
FEATURE_NORMS = ("auto", "robust", "none")
GAN_NOISE = ("seed", "const")
GAN_DTYPES = ("float32", "float16", "bfloat16")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class DiffusionConfig:
    """Sampling and feature-tap settings of a diffusers text-to-image backbone (`backbone.kind:
    diffusion`): SD 1.x/2.x, SDXL, SD3 or FLUX, the family read from the pipeline folder."""

    scheduler: str = "auto"
    """Sampler, built from the pipeline's own scheduler config: "auto" (the class the folder ships
    with); for UNets (SD, SDXL) "ddim", "euler", "euler_a", "dpmsolver++" (DPM-Solver++ 2M) or "lcm";
    for flow-matching transformers (SD3, FLUX) "flow_euler". A sampler that does not fit the
    folder's family is refused."""
    steps: int = 10
    """Denoising steps per image."""
    guidance_scale: float = 7.5
    """Guidance the way the family takes it: classifier-free guidance for SD/SDXL/SD3 (1.0 turns it
    off: one pass per step instead of two); FLUX's embedded guidance (always one pass)."""
    resolution: int = 64
    """Image size in pixels (a multiple of the VAE factor times the denoiser's downsampling or patch
    size); real checkpoints want 512 (SD 1.x), 768 (SD 2.x) or 1024 (SDXL, SD3, FLUX)."""
    dtype: str = "auto"
    """Weights and activations: "auto" is float32 on CPU and on CUDA bfloat16 where the GPU supports
    it (else float16); or "float32", "float16", "bfloat16". The backbone's identity (weights hash)
    does not depend on it."""
    feature_steps: list[int] = field(default_factory=lambda: [-1])
    """Denoising steps whose features (and attention maps) the decoder reads; -1 is the last. Several
    steps are concatenated per resolution (the decoder fuses them); inversion noises a real image to
    each of their noise levels."""
    feature_blocks: list[int] = field(default_factory=list)
    """Denoiser blocks tapped, by index (negative from the end): UNet down, mid and up blocks in
    order; transformer blocks in order (FLUX: double-stream, then single-stream). Empty: every UNet
    block; for a transformer 4 evenly spaced blocks ending with the last."""
    feature_norm: str = "auto"
    """Per-channel robust normalisation of block features ((x - median) / MAD over positions, per
    sample): "robust", "none", or "auto" (robust for transformers, whose few "massive activation"
    channels would swamp a decoder; none for UNets). Recorded in the feature names."""
    inversion_timestep: int | None = None
    """Real images are VAE-encoded, noised to this timestep (0-999; sigma = t / 1000 for flow
    matching) and passed through the denoiser once to tap the same features (the paper's inversion).
    None uses the noise level of each of `feature_steps` in the sampling schedule, so the decoder is
    trained and applied at the same noise levels; a fixed value needs a single feature step."""
    attention_maps: bool = True
    """Also tap the image->text attention maps (per prompt token, averaged over heads) of the tapped
    blocks."""
    max_prompt_tokens: int = 8
    """Attention tokens kept as features (after CLIP's start token); the full text length (77, or
    hundreds of T5 tokens) costs memory and rarely helps."""
    image_features: bool = False
    """Also give the decoder the image itself at full resolution (RGB in [-1, 1]: the sample's own
    pixels when generating, the real image when inverting), beside the denoiser's coarser maps."""

    def __post_init__(self) -> None:
        one_of("backbone.diffusion.scheduler", self.scheduler, SCHEDULERS)
        one_of("backbone.diffusion.dtype", self.dtype, DTYPES)
        one_of("backbone.diffusion.feature_norm", self.feature_norm, FEATURE_NORMS)
        at_least("backbone.diffusion", self, 1, ("steps", "max_prompt_tokens"))
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"backbone.diffusion.resolution must be a multiple of 8, got {self.resolution}")
        if not self.feature_steps:
            raise ConfigError("backbone.diffusion.feature_steps must name at least one step, got []")
        bad = [s for s in self.feature_steps if not -self.steps <= s < self.steps]
        if bad:
            raise ConfigError(f"backbone.diffusion.feature_steps must index the {self.steps} steps, got {bad}")
        if len({s % self.steps for s in self.feature_steps}) != len(self.feature_steps):
            raise ConfigError(f"backbone.diffusion.feature_steps has a step twice: {list(self.feature_steps)}")
        if self.inversion_timestep is not None:
            within("backbone.diffusion.inversion_timestep", self.inversion_timestep, 0, 1000, open_high=True)
            if len(self.feature_steps) > 1:
                raise ConfigError("backbone.diffusion.inversion_timestep is one noise level; with several "
                                  f"feature_steps {list(self.feature_steps)} leave it null")
        at_least("backbone.diffusion", self, 1, ("guidance_scale",))


@dataclass
class BackboneConfig:
    kind: str = "stylegan2"
    """Which generator: "stylegan2" (DatasetGAN: seeds -> images) or "diffusion" (DatasetDM: a
    Stable Diffusion pipeline, prompts + seeds -> images)."""
    weights: str | None = None
    """stylegan2: a local path or storage URL (s3://...) of an official stylegan2-ada-pytorch /
    stylegan3 `networks_stylegan2` pickle (its G_ema), a rosinality/stylegan2-pytorch `.pt`, or a
    safetensors file written by `factory weights convert` or `factory pretrain`; the format is read
    from the file, never executed. diffusion: a diffusers pipeline folder (`save_pretrained` layout) of
    StableDiffusionPipeline (1.x/2.x), StableDiffusionXLPipeline, StableDiffusion3Pipeline or
    FluxPipeline (read from its model_index.json), or a hub id where a hub is reachable. None builds a tiny seeded
    random-weight model from configs (the embedded default)."""
    init_seed: int = 0
    """Seed of the random weights when `weights` is None."""
    psi: float = 0.7
    """Truncation: w = w_avg + psi * (w - w_avg). 1.0 is no truncation."""
    rgb_taps: bool = True
    """Also feed each block's running skip-RGB image (StyleGAN2's toRGB outputs) to the decoder,
    besides every conv layer's features."""
    feature_resolutions: list[int] = field(default_factory=list)
    """stylegan2: the blocks whose features (conv layers, and skip images with `rgb_taps`) the decoder
    reads, by resolution, e.g. [16, 32]; each must be one of the generator's blocks (4, 8, ...,
    its resolution). Empty: every block, as DatasetGAN does. A fitted decoder records the maps it
    read, and generating with another selection is refused. From 16 labels, leaving out the coarsest
    blocks can generalise better (the demo reads 16 and 32 px: benchmarks/QUALITY.md)."""
    batch_invariant: bool = False
    """Per-seed mode: run the generator one seed per forward pass, so a sample equals its seed
    generated alone, whatever else is generated with it. It costs most of the batching speed-up (on
    a GPU, nearly all of it), so it is off: batches are then part of the contract instead (a sample is
    a function of its seed and its batch, and every path that regenerates a seed uses the same
    batches: `generate.batch_size` blocks from each shard's first seed, `annotate.batch_size` blocks
    of the export), so rebuilt shards and retraining reproduce their bytes exactly."""
    noise: str = "seed"
    """stylegan2: the per-layer noise. "seed": drawn from each sample's seed (a sample is a function
    of its seed). "const": the checkpoint's stored `noise_const` buffers, exactly as the official
    `noise_mode='const'` (the default of the official generate.py), for labels made on such images."""
    classes: list[int] = field(default_factory=list)
    """stylegan2, class-conditional checkpoints (c_dim > 0): the class indices to generate, seed s
    taking classes[s % len(classes)] (one entry: a fixed class); recorded with every sample. Must be
    empty for an unconditional generator."""
    dtype: str = "float32"
    """stylegan2: precision of the checkpoint's float16 blocks (`num_fp16_res`) on CUDA: "float32"
    (exact), "float16" (as the official network runs them), "bfloat16". On a CPU every block runs
    in float32. (A diffusion backbone uses `backbone.diffusion.dtype`.)"""
    inversion_steps: int = 300
    """stylegan2: Adam steps that project a real image into W+ (`invert`: labeling real photos with a
    Style Interpreter, scoring it against their ground truth). Each step is a forward and backward
    pass of the synthesis network over the batch."""
    inversion_lr: float = 0.05
    """stylegan2: the projection's learning rate (cosine-decayed to zero over `inversion_steps`)."""
    stylegan2: StyleGAN2Config = field(default_factory=lambda: StyleGAN2Config(channel_max=8))
    """Architecture of the random-weight generator; with `weights` set, the file's stored
    architecture is used instead."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Sampler and feature taps of the diffusion backbone."""

    def __post_init__(self) -> None:
        if self.kind not in ("stylegan2", "diffusion"):
            raise ConfigError(f"backbone.kind must be 'stylegan2' or 'diffusion', got {self.kind!r}")
        within("backbone.psi", self.psi, 0.0, 2.0)
        one_of("backbone.noise", self.noise, GAN_NOISE)
        at_least("backbone", self, 1, ("inversion_steps",))
        at_least("backbone", self, 0, ("init_seed",))
        positive("backbone", self, ("inversion_lr",))
        one_of("backbone.dtype", self.dtype, GAN_DTYPES)
        bad = [c for c in self.classes if isinstance(c, bool) or not isinstance(c, int) or c < 0]
        if bad:
            raise ConfigError(f"backbone.classes must list class indices >= 0, got {list(self.classes)}")
        if self.kind == "diffusion" and self.feature_resolutions:
            raise ConfigError(f"backbone.feature_resolutions={list(self.feature_resolutions)} selects a StyleGAN2's "
                              "blocks; a diffusion backbone's are backbone.diffusion.feature_blocks")
        if len(set(self.feature_resolutions)) != len(self.feature_resolutions) or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 4 for r in self.feature_resolutions):
            raise ConfigError(f"backbone.feature_resolutions must list block resolutions (4, 8, 16, ...) once each, "
                              f"got {list(self.feature_resolutions)}")


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
    standardize: bool = True
    """interpreter: shift and scale each feature channel by its mean and standard deviation over the
    labeled training images before the heads (fixed before training, stored with the decoder), so
    maps of very different scales count alike; false feeds the raw features, as the paper's release."""
    prior_correction: float = 0.0
    """interpreter, segmentation, with `train.class_balanced`: the heads learn from pixels drawn
    evenly over the classes, so they treat every class as equally likely and draw small parts larger
    than the labels do; a value > 0 shifts their logits by this power of the training labels' class
    frequencies (logit adjustment, fixed before training, stored with the decoder, no cost per
    sample); 1 restores the labels' prior. Issue 18's measurement: 0.5 makes the labels' class shares
    match the annotator's and their agreement with it higher, but trains a worse downstream
    segmenter than 0 (the default), so it is for users who need the areas right."""
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
        distinct_subset("decoder.tasks", list(self.tasks), DECODER_TASKS["perception"])
        at_least("decoder", self, 0, ("init_seed",))
        if self.hidden is not None and (len(self.hidden) != 2 or min(self.hidden) < 1):
            raise ConfigError(f"decoder.hidden must be two positive widths, got {self.hidden}")
        at_least("decoder", self, 1, ("num_heads", "dim", "num_queries", "num_layers"))
        if self.num_queries > 255:
            raise ConfigError(f"decoder.num_queries must be <= 255 (instance ids are 8-bit), got {self.num_queries}")
        within("decoder.instance_threshold", self.instance_threshold, 0.0, 1.0, open_low=True, open_high=True)
        within("decoder.uncertainty_top_fraction", self.uncertainty_top_fraction, 0.0, 1.0, open_low=True)
        within("decoder.prior_correction", self.prior_correction, 0.0, 1.0)
        positive("decoder", self, ("heatmap_sigma",))

    def active_tasks(self) -> list[str]:
        """What this decoder predicts."""
        return [self.task] if self.kind == "interpreter" else list(self.tasks)


@dataclass
class LabelsConfig:
    classes: list[str] = field(default_factory=lambda: ["background", "blue"])
    """Segmentation classes; the index in this list is the pixel value in mask PNGs. The default is
    the colour rule of random-weight backbones (`factory.toy.annotator.color_annotator`); the demo uses
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
        positive("labels", self, ("depth_scale",))
