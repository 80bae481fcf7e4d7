"""StyleGAN2 generator whose synthesis conv outputs are the pixel features of a DatasetGAN decoder.

Written from Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (weight
demodulation, skip generator); no NVIDIA code is used.

Parameter and buffer names and shapes equal stylegan2-ada-pytorch's (and stylegan3's
`networks_stylegan2`) `G_ema.state_dict()` without its fixed `*.resample_filter` buffers:
`mapping.fc{i}.*`, `mapping.embed.*` (class-conditional), `mapping.w_avg`, `synthesis.b{res}.const`,
`synthesis.b{res}.{conv0,conv1,torgb}.*`, and the optional `*.noise_const` buffers. Everything an
official snapshot uses is reproduced: `conv_clamp` (where the official layers clamp), class
conditioning, const noise, and `num_fp16_res` blocks (float32 on a CPU; float16/bfloat16 on request
on CUDA). Reading official pickles, rosinality checkpoints and this project's safetensors (one function
picks the reader from the file) is `stylegan2_formats.py`; the project's own file is `stylegan2_file.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factory.config import ConfigError, StyleGAN2Config

NOISE_MODES = ("seed", "const", "none")
_LRELU_GAIN = math.sqrt(2.0)


@dataclass
class StyleGAN2Arch(StyleGAN2Config):
    """A generator's whole architecture: the `backbone.stylegan2` settings plus the mapping network's
    widths, which official generators may set (`mapping_kwargs`) and a random-weight generator never
    does. Every weights reader returns one and every generator carries one (`StyleGAN2Generator.cfg`);
    files written before these fields existed read with both at w_dim, the official default."""

    embed_features: int | None = None
    """Width of the class embedding `mapping.embed` (official `mapping_kwargs.embed_features`); None
    is w_dim. An unconditional generator (c_dim=0) has no embedding and records w_dim."""
    layer_features: int | None = None
    """Width of the hidden mapping layers `mapping.fc0` .. `fc{n-2}` (official
    `mapping_kwargs.layer_features`); None is w_dim, as is a one-layer mapping's (no hidden layer)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("embed_features", "layer_features"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"stylegan2 {name} must be a positive integer or null, got {value!r}")
        if self.embed_features is None or self.c_dim == 0:
            self.embed_features = self.w_dim
        if self.layer_features is None or self.mapping_layers == 1:
            self.layer_features = self.w_dim


def as_arch(cfg: StyleGAN2Config) -> StyleGAN2Arch:
    """`cfg` as a whole architecture (a `backbone.stylegan2` config has the default mapping widths)."""
    if isinstance(cfg, StyleGAN2Arch):
        return cfg
    return StyleGAN2Arch(**{f.name: getattr(cfg, f.name) for f in fields(StyleGAN2Config)})


def feature_info(cfg: StyleGAN2Config, rgb_taps: bool = False) -> list[tuple[str, int, int]]:
    """(name, channels, resolution) of every tap, in the order `sample` returns them: each block's
    conv layers (`b{res}.conv0`, `b{res}.conv1`; the 4 px block has conv1 only) and, with `rgb_taps`,
    its running skip image (`b{res}.rgb`)."""
    info = []
    for res in cfg.block_resolutions:
        info += [(f"b{res}.{n}", cfg.channels(res), res) for n in (["conv1"] if res == 4 else ["conv0", "conv1"])]
        if rgb_taps:
            info.append((f"b{res}.rgb", cfg.img_channels, res))
    return info


def num_ws(cfg: StyleGAN2Config) -> int:
    """How many per-layer w the official network broadcasts (every conv layer, plus the last toRGB)."""
    return len(feature_info(cfg)) + 1


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool, padding: int) -> Tensor:
    """Per-sample weights as one grouped conv: the batch becomes the group axis (paper, Sec. 2.2).
    Modulation and demodulation run in the weights' precision; the conv in the activations' (as the
    official fused path does for its float16 blocks)."""
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    wts = weight.unsqueeze(0) * styles.reshape(b, 1, cin, 1, 1)
    if demodulate:
        wts = wts * (wts.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    wts = wts.reshape(b * cout, cin, kh, kw).to(x.dtype)
    out = F.conv2d(x.reshape(1, b * cin, h, w), wts, padding=padding, groups=b)
    return out.reshape(b, cout, out.shape[2], out.shape[3])


def upsample2d(x: Tensor, padding: int = 1) -> Tensor:
    """x2 zero-insertion upsampling filtered by the separable [1,3,3,1] FIR (gain 4), zero-padded.

    padding=1 gives exactly 2H (bilinear in the interior); padding=0 keeps the filter's one-pixel tails
    (2H+2), which is the border a following unpadded 3x3 conv needs to match the official up-conv.
    """
    c = x.shape[1]
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype, device=x.device)
    k = (torch.outer(f, f) / 16.0).expand(c, 1, 4, 4).contiguous()
    return F.conv_transpose2d(x, k, stride=2, padding=padding, groups=c)


def _clamp(x: Tensor, limit: float | None) -> Tensor:
    return x if limit is None else x.clamp(-limit, limit)


@torch.no_grad()
def seeded_init(model: nn.Module, seed: int) -> None:
    """Paper init of every layer under `model`, drawn from one local generator, so the weights depend
    on the seed alone (each layer's `reset_parameters(gen)`)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters(gen)


class FullyConnected(nn.Module):
    """Equalized-lr linear layer: weights stored at unit scale so Adam's per-weight steps are uniform."""

    def __init__(self, in_features: int, out_features: int, lr_multiplier: float = 1.0,
                 bias_init: float = 0.0, activate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.lr_multiplier, self.bias_init, self.activate = lr_multiplier, bias_init, activate
        self.weight_gain = lr_multiplier / math.sqrt(in_features)

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=gen) / self.lr_multiplier)
        self.bias.fill_(self.bias_init / self.lr_multiplier)

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_multiplier)
        return F.leaky_relu(x, 0.2) * _LRELU_GAIN if self.activate else x


def normalize_2nd_moment(x: Tensor) -> Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


class MappingNetwork(nn.Module):
    """z (and a one-hot class, embedded to `embed_features` and normalised like z) -> w, through
    `mapping_layers` layers: z_dim (+ embed_features) -> layer_features -> ... -> w_dim."""

    def __init__(self, cfg: StyleGAN2Config) -> None:
        super().__init__()
        cfg = as_arch(cfg)
        self.w_avg_beta = cfg.w_avg_beta
        self.c_dim = cfg.c_dim
        if cfg.c_dim > 0:
            self.embed = FullyConnected(cfg.c_dim, cfg.embed_features)
        first = cfg.z_dim + (cfg.embed_features if cfg.c_dim > 0 else 0)
        dims = [first] + [cfg.layer_features] * (cfg.mapping_layers - 1) + [cfg.w_dim]
        for i in range(cfg.mapping_layers):
            setattr(self, f"fc{i}", FullyConnected(dims[i], dims[i + 1], cfg.mapping_lr_multiplier, activate=True))
        self.num_layers = cfg.mapping_layers
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: Tensor, psi: float = 1.0, update_w_avg: bool = False, c: Tensor | None = None) -> Tensor:
        x = normalize_2nd_moment(z)
        if self.c_dim > 0:
            if c is None or c.shape != (z.shape[0], self.c_dim):
                got = None if c is None else tuple(c.shape)
                raise ValueError(f"a class-conditional generator needs c of shape [{z.shape[0]}, {self.c_dim}], got {got}")
            x = torch.cat([x, normalize_2nd_moment(self.embed(c))], dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            self.w_avg.copy_(x.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if psi != 1.0:
            x = self.w_avg + psi * (x - self.w_avg)
        return x


class SynthesisLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.noise_strength = nn.Parameter(torch.empty(()))
        self.register_buffer("noise_const", None)  # [res, res] when the weights file stores them
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=gen))
        self.bias.zero_()
        self.noise_strength.zero_()

    def forward(self, x: Tensor, w: Tensor, noise: Tensor | None) -> Tensor:
        styles = self.affine(w)
        weight = self.weight
        if x.dtype == torch.float16:  # the official pre-normalisation against float16 overflow
            weight = weight * (weight[0].numel() ** -0.5 / weight.abs().amax(dim=(1, 2, 3), keepdim=True))
            styles = styles / styles.abs().amax(dim=1, keepdim=True)
        if self.up:
            # Official up-conv kernels act as true convolutions (inherited from TF's transposed conv).
            x = modulated_conv2d(upsample2d(x, padding=0), weight.flip([2, 3]), styles, True, padding=0)
        else:
            x = modulated_conv2d(x, weight, styles, True, padding=1)
        if noise is not None:
            x = x + (noise * self.noise_strength).to(x.dtype)
        x = F.leaky_relu(x + self.bias.to(x.dtype).reshape(1, -1, 1, 1), 0.2) * _LRELU_GAIN
        return _clamp(x, self.conv_clamp)  # after bias, activation and gain, as the official bias_act


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, img_channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.empty(img_channels, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.empty(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_ch)
        self.conv_clamp = conv_clamp

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=gen))
        self.bias.zero_()

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, False, padding=0) + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return _clamp(x, self.conv_clamp)


class SynthesisBlock(nn.Module):
    def __init__(self, cfg: StyleGAN2Config, res: int) -> None:
        super().__init__()
        out_ch, clamp = cfg.channels(res), cfg.conv_clamp
        if res == 4:
            self.const = nn.Parameter(torch.empty(out_ch, 4, 4))
        else:
            self.conv0 = SynthesisLayer(cfg.channels(res // 2), out_ch, cfg.w_dim, res, up=True, conv_clamp=clamp)
        self.conv1 = SynthesisLayer(out_ch, out_ch, cfg.w_dim, res, up=False, conv_clamp=clamp)
        self.torgb = ToRGB(out_ch, cfg.img_channels, cfg.w_dim, conv_clamp=clamp)
        self.resolution = res
        self.reduced = res in cfg.fp16_resolutions

    def reset_parameters(self, gen: torch.Generator) -> None:
        if self.resolution == 4:
            self.const.copy_(torch.randn(self.const.shape, generator=gen))

    @property
    def layer_names(self) -> list[str]:
        return ["conv1"] if self.resolution == 4 else ["conv0", "conv1"]


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: StyleGAN2Config) -> None:
        super().__init__()
        self.resolutions = cfg.block_resolutions
        self.num_ws = num_ws(cfg)
        for res in self.resolutions:
            setattr(self, f"b{res}", SynthesisBlock(cfg, res))
        self.reduced_dtype: torch.dtype | None = None
        """float16/bfloat16 for the checkpoint's `num_fp16_res` blocks; None runs them in float32."""

    def _per_layer(self, w: Tensor) -> list[Tensor]:
        count = self.num_ws
        if w.dim() == 2:
            return [w] * count
        if w.dim() != 3 or w.shape[1] != count:
            raise ValueError(f"w must be [B, w_dim] or W+ [B, {count}, w_dim], got {tuple(w.shape)}")
        return list(w.unbind(1))

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.resolutions]

    def layers(self) -> list[SynthesisLayer]:
        return [getattr(block, name) for block in self.blocks() for name in block.layer_names]

    def forward(self, w: Tensor, noise: list[Tensor | None], rgb_taps: bool = False
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """w: [B, w_dim] for every layer, or W+ [B, num_ws, w_dim], one per conv layer in order, each
        block's toRGB taking the w after its convs (the official broadcast's indexing)."""
        ws = self._per_layer(w)
        feats: dict[str, Tensor] = {}
        x = img = None
        noise_iter = iter(noise)
        k = 0
        for block in self.blocks():
            dtype = self.reduced_dtype if block.reduced and self.reduced_dtype is not None else torch.float32
            if x is None:
                x = block.const.unsqueeze(0).expand(w.shape[0], -1, -1, -1)
            x = x.to(dtype)
            for name in block.layer_names:
                x = getattr(block, name)(x, ws[k], next(noise_iter))
                feats[f"b{block.resolution}.{name}"] = x.float()
                k += 1
            y = block.torgb(x, ws[k]).float()
            img = y if img is None else upsample2d(img) + y
            if rgb_taps:
                feats[f"b{block.resolution}.rgb"] = img
        return img, feats


class StyleGAN2Generator(nn.Module):
    """z (and a class) -> (image, every synthesis conv output), with seed-addressable sampling for DatasetGAN.
    Images are [B, img_channels, H, W] as the network draws them (one channel for a grayscale
    generator); the backbone (`gan.py`) shows them as RGB."""

    def __init__(self, cfg: StyleGAN2Config, seed: int = 0, w_avg_samples: int = 4096) -> None:
        super().__init__()
        self.cfg = as_arch(cfg)
        cfg = self.cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)
        self.reset_parameters(seed)
        if w_avg_samples > 0:
            self.compute_w_avg(w_avg_samples, seed)

    def reset_parameters(self, seed: int) -> None:
        seeded_init(self, seed)

    @torch.no_grad()
    def compute_w_avg(self, num_samples: int = 4096, seed: int = 0) -> Tensor:
        """Centre of W for truncation; a fresh model's zero buffer would truncate towards nothing. A
        class-conditional generator's classes are drawn uniformly from the same generator."""
        gen = torch.Generator("cpu").manual_seed(seed)
        z = torch.randn(num_samples, self.cfg.z_dim, generator=gen)
        c = None
        if self.cfg.c_dim > 0:
            c = self.one_hot(torch.randint(self.cfg.c_dim, (num_samples,), generator=gen).tolist())
        device = self.mapping.w_avg.device
        w = self.mapping(z.to(device), c=None if c is None else c.to(device))
        self.mapping.w_avg.copy_(w.mean(0))
        return self.mapping.w_avg.clone()

    def feature_info(self, rgb_taps: bool = False) -> list[tuple[str, int, int]]:
        return feature_info(self.cfg, rgb_taps)

    def noise_shapes(self) -> list[tuple[int, int]]:
        return [(res, res) for _, _, res in self.feature_info()]

    @property
    def has_noise_const(self) -> bool:
        return all(layer.noise_const is not None for layer in self.synthesis.layers())

    def one_hot(self, classes: Sequence[int]) -> Tensor:
        """[B, c_dim] one-hot labels, as the official generate.py builds them."""
        bad = [c for c in classes if not 0 <= c < self.cfg.c_dim]
        if bad:
            raise ValueError(f"class {bad[0]} is outside this generator's {self.cfg.c_dim} classes (c_dim)")
        return F.one_hot(torch.tensor(list(classes), dtype=torch.long), self.cfg.c_dim).float()

    def _draw(self, seeds: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        if len(seeds) == 0:
            raise ValueError("seeds must be a non-empty sequence of ints")
        shapes = self.noise_shapes()
        zs: list[Tensor] = []
        noise: list[list[Tensor]] = [[] for _ in shapes]
        for seed in seeds:
            gen = torch.Generator("cpu").manual_seed(int(seed))
            zs.append(torch.randn(self.cfg.z_dim, generator=gen))
            for per_layer, shape in zip(noise, shapes):
                per_layer.append(torch.randn((1, *shape), generator=gen))
        device = self.mapping.w_avg.device
        return torch.stack(zs).to(device), [torch.stack(n).to(device) for n in noise]

    def make_noise(self, seeds: Sequence[int]) -> list[Tensor]:
        """The exact noise `sample(seeds)` uses: one [B, 1, r, r] map per conv layer."""
        return self._draw(seeds)[1]

    def const_noise(self, batch: int) -> list[Tensor]:
        """The stored `noise_const` maps, as the official `noise_mode='const'` uses them."""
        if not self.has_noise_const:
            raise ValueError("noise 'const' needs the noise_const buffers of an official checkpoint; "
                             "these weights have none (use backbone.noise=seed)")
        return [layer.noise_const.reshape(1, 1, *layer.noise_const.shape).expand(batch, -1, -1, -1)
                for layer in self.synthesis.layers()]

    def inputs(self, seeds: Sequence[int], noise_mode: str = "seed", classes: Sequence[int] | None = None
               ) -> tuple[Tensor, list[Tensor] | None, Tensor | None]:
        """(z, noise, c) of each seed: z and seed noise from the seed's own CPU generator, const noise
        from the checkpoint, c one-hot from `classes` (one per seed) for a conditional generator."""
        z, noise = self._draw(seeds)
        if noise_mode == "const":
            noise = self.const_noise(len(seeds))
        elif noise_mode == "none":
            noise = None
        elif noise_mode != "seed":
            raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        c = None
        if self.cfg.c_dim > 0:
            if classes is None or len(classes) != len(seeds):
                raise ValueError(f"a class-conditional generator (c_dim={self.cfg.c_dim}) needs one class per seed")
            c = self.one_hot(classes).to(z.device)
        return z, noise, c

    def check_noise(self, noise: list[Tensor] | None) -> list[Tensor | None]:
        shapes = self.noise_shapes()
        if noise is None:
            return [None] * len(shapes)
        if len(noise) != len(shapes):
            raise ValueError(f"noise must have {len(shapes)} maps (one per conv layer), got {len(noise)}")
        for i, (n, shape) in enumerate(zip(noise, shapes)):
            if tuple(n.shape[-2:]) != shape:
                raise ValueError(f"noise[{i}] must end in {shape}, got {tuple(n.shape)}")
        return list(noise)

    def forward(self, z: Tensor, psi: float = 1.0, noise: list[Tensor] | None = None,
                rgb_taps: bool = False, c: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """noise=None means no noise (ada's noise_mode='none'): deterministic, never re-randomised."""
        layer_noise = self.check_noise(noise)
        w = self.mapping(z, psi=psi, c=c)
        return self.synthesis(w, layer_noise, rgb_taps=rgb_taps)

    def synthesize(self, w: Tensor, noise: list[Tensor] | None = None, rgb_taps: bool = False
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """A given w (a projector's output, an edit) straight to the synthesis network."""
        return self.synthesis(w, self.check_noise(noise), rgb_taps=rgb_taps)

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], psi: float = 1.0, rgb_taps: bool = False, noise_mode: str = "seed",
               classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z and noise of each sample come from its own CPU generator, so a sample depends only on
        (weights, seed, psi, class): not on its batch-mates nor the device. Fixes DatasetGAN's
        re-randomised noise."""
        z, noise, c = self.inputs(seeds, noise_mode, classes)
        image, feats = self(z, psi=psi, noise=noise, rgb_taps=rgb_taps, c=c)
        return z, image, feats
