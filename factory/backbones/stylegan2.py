"""StyleGAN2 generator whose synthesis conv outputs are the pixel features of a DatasetGAN decoder.

Written from Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (weight
demodulation, skip generator); no NVIDIA code is used.

Checkpoint layouts. Parameter names and shapes equal stylegan2-ada-pytorch's (and stylegan3's
`networks_stylegan2`) `G_ema.state_dict()` for c_dim=0, unpickled with their code, so conversion is a
key copy: `mapping.fc{i}.*`, `mapping.w_avg`, `synthesis.b{res}.const`, `synthesis.b{res}.{conv0,conv1,
torgb}.*`. Drop their buffers `*.resample_filter` (the [1,3,3,1] FIR is fixed here) and
`*.noise_const` (noise is drawn per seed by `sample`). Their channel formula is used unchanged:
channel_base=32768, channel_max=512 for `--cfg=stylegan2`. Not supported: conditioning
(`mapping.embed`), fp16 blocks and `conv_clamp` (clamping at +-256 is skipped), per-layer ws.
StyleGAN3's alias-free generator is a different network. TF pickles: convert with ada's `legacy.py`
(it transposes, flips up-conv kernels and adds TF's implicit +1 to `mod_bias`), then copy.
rosinality/stylegan2-pytorch: rename `style.{i+1}`->`mapping.fc{i}`, `latent_avg`->`mapping.w_avg`,
`input.input[0]`->`b4.const`, `conv1`/`to_rgb1`->`b4.conv1`/`b4.torgb`, `convs.{2k,2k+1}`/`to_rgbs.{k}`
->`b{8*2**k}.conv0,conv1`/`.torgb`; in a layer `conv.weight[0]`->`weight`, `conv.modulation`->`affine`,
`noise.weight[0]`->`noise_strength`, `activate.bias` or ToRGB `bias.flatten()`->`bias`. Its up-conv
kernels already have ada's orientation (both flip TF's); check a converted model against reference images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factory import tensorfile
from factory.config import StyleGAN2Config

FORMAT = "factory.stylegan2"
_LRELU_GAIN = math.sqrt(2.0)


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


def read_architecture(path: str) -> StyleGAN2Config:
    """The architecture stored in a weights file written by `save_stylegan2`, without its tensors."""
    stored = _read_config(Path(path), tensorfile.read_metadata(str(path), None, "StyleGAN2 weights file"))
    if stored is None:
        raise ValueError(f"{path} has no factory.stylegan2 config metadata")
    return stored


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool, padding: int) -> Tensor:
    """Per-sample weights as one grouped conv: the batch becomes the group axis (paper, Sec. 2.2)."""
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    wts = weight.unsqueeze(0) * styles.reshape(b, 1, cin, 1, 1)
    if demodulate:
        wts = wts * (wts.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    out = F.conv2d(x.reshape(1, b * cin, h, w), wts.reshape(b * cout, cin, kh, kw), padding=padding, groups=b)
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


class MappingNetwork(nn.Module):
    def __init__(self, cfg: StyleGAN2Config) -> None:
        super().__init__()
        self.w_avg_beta = cfg.w_avg_beta
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        for i in range(cfg.mapping_layers):
            setattr(self, f"fc{i}", FullyConnected(dims[i], dims[i + 1], cfg.mapping_lr_multiplier, activate=True))
        self.num_layers = cfg.mapping_layers
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: Tensor, psi: float = 1.0, update_w_avg: bool = False) -> Tensor:
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            self.w_avg.copy_(x.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if psi != 1.0:
            x = self.w_avg + psi * (x - self.w_avg)
        return x


class SynthesisLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool) -> None:
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_ch))
        self.noise_strength = nn.Parameter(torch.empty(()))
        self.resolution, self.up = resolution, up

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=gen))
        self.bias.zero_()
        self.noise_strength.zero_()

    def forward(self, x: Tensor, w: Tensor, noise: Tensor | None) -> Tensor:
        styles = self.affine(w)
        if self.up:
            # Official up-conv kernels act as true convolutions (inherited from TF's transposed conv).
            x = modulated_conv2d(upsample2d(x, padding=0), self.weight.flip([2, 3]), styles, True, padding=0)
        else:
            x = modulated_conv2d(x, self.weight, styles, True, padding=1)
        if noise is not None:
            x = x + noise * self.noise_strength
        return F.leaky_relu(x + self.bias.reshape(1, -1, 1, 1), 0.2) * _LRELU_GAIN


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, img_channels: int, w_dim: int) -> None:
        super().__init__()
        self.affine = FullyConnected(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.empty(img_channels, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.empty(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_ch)

    def reset_parameters(self, gen: torch.Generator) -> None:
        self.weight.copy_(torch.randn(self.weight.shape, generator=gen))
        self.bias.zero_()

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        return modulated_conv2d(x, self.weight, styles, False, padding=0) + self.bias.reshape(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    def __init__(self, cfg: StyleGAN2Config, res: int) -> None:
        super().__init__()
        out_ch = cfg.channels(res)
        if res == 4:
            self.const = nn.Parameter(torch.empty(out_ch, 4, 4))
        else:
            self.conv0 = SynthesisLayer(cfg.channels(res // 2), out_ch, cfg.w_dim, res, up=True)
        self.conv1 = SynthesisLayer(out_ch, out_ch, cfg.w_dim, res, up=False)
        self.torgb = ToRGB(out_ch, cfg.img_channels, cfg.w_dim)
        self.resolution = res

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
        for res in self.resolutions:
            setattr(self, f"b{res}", SynthesisBlock(cfg, res))

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.resolutions]

    def forward(self, w: Tensor, noise: list[Tensor | None], rgb_taps: bool = False
                ) -> tuple[Tensor, dict[str, Tensor]]:
        feats: dict[str, Tensor] = {}
        x = img = None
        noise_iter = iter(noise)
        for block in self.blocks():
            if x is None:
                x = block.const.unsqueeze(0).expand(w.shape[0], -1, -1, -1)
            for name in block.layer_names:
                x = getattr(block, name)(x, w, next(noise_iter))
                feats[f"b{block.resolution}.{name}"] = x
            y = block.torgb(x, w)
            img = y if img is None else upsample2d(img) + y
            if rgb_taps:
                feats[f"b{block.resolution}.rgb"] = img
        return img, feats


class StyleGAN2Generator(nn.Module):
    """z -> (image, every synthesis conv output), with seed-addressable sampling for DatasetGAN."""

    def __init__(self, cfg: StyleGAN2Config, seed: int = 0, w_avg_samples: int = 4096) -> None:
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = SynthesisNetwork(cfg)
        self.reset_parameters(seed)
        if w_avg_samples > 0:
            self.compute_w_avg(w_avg_samples, seed)

    def reset_parameters(self, seed: int) -> None:
        seeded_init(self, seed)

    @torch.no_grad()
    def compute_w_avg(self, num_samples: int = 4096, seed: int = 0) -> Tensor:
        """Centre of W for truncation; a fresh model's zero buffer would truncate towards nothing."""
        z = torch.randn(num_samples, self.cfg.z_dim, generator=torch.Generator("cpu").manual_seed(seed))
        w = self.mapping(z.to(self.mapping.w_avg.device))
        self.mapping.w_avg.copy_(w.mean(0))
        return self.mapping.w_avg.clone()

    def feature_info(self, rgb_taps: bool = False) -> list[tuple[str, int, int]]:
        return feature_info(self.cfg, rgb_taps)

    def noise_shapes(self) -> list[tuple[int, int]]:
        return [(res, res) for _, _, res in self.feature_info()]

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

    def forward(self, z: Tensor, psi: float = 1.0, noise: list[Tensor] | None = None,
                rgb_taps: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """noise=None means no noise (ada's noise_mode='none'): deterministic, never re-randomised."""
        shapes = self.noise_shapes()
        if noise is None:
            layer_noise: list[Tensor | None] = [None] * len(shapes)
        else:
            if len(noise) != len(shapes):
                raise ValueError(f"noise must have {len(shapes)} maps (one per conv layer), got {len(noise)}")
            for i, (n, shape) in enumerate(zip(noise, shapes)):
                if tuple(n.shape[-2:]) != shape:
                    raise ValueError(f"noise[{i}] must end in {shape}, got {tuple(n.shape)}")
            layer_noise = list(noise)
        w = self.mapping(z, psi=psi)
        return self.synthesis(w, layer_noise, rgb_taps=rgb_taps)

    @torch.no_grad()
    def sample(self, seeds: Sequence[int], psi: float = 1.0, rgb_taps: bool = False
               ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z and noise of each sample come from its own CPU generator, so a sample depends only on
        (weights, seed, psi): not on its batch-mates nor the device. Fixes DatasetGAN's re-randomised noise."""
        z, noise = self._draw(seeds)
        image, feats = self(z, psi=psi, noise=noise, rgb_taps=rgb_taps)
        return z, image, feats


def save_stylegan2(model: StyleGAN2Generator, path: str | Path) -> None:
    tensorfile.write(str(path), model.state_dict(), FORMAT, {"config": json.dumps(asdict(model.cfg))})


def _read_config(path: Path, metadata: dict[str, str]) -> StyleGAN2Config | None:
    if "config" not in metadata:
        return None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        return StyleGAN2Config(**json.loads(metadata["config"]))
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: stored stylegan2 config is unreadable: {e}") from e


def load_stylegan2(path: str | Path, cfg: StyleGAN2Config | None = None,
                   device: str | torch.device = "cpu") -> StyleGAN2Generator:
    """Strict load: every key and shape must match, and all problems are reported in one error."""
    path = Path(path)
    tensors, metadata = tensorfile.read(str(path), None, "StyleGAN2 weights file")
    stored = _read_config(path, metadata)
    if stored is None and cfg is None:
        raise ValueError(f"{path} has no factory.stylegan2 config metadata; pass cfg explicitly")
    if stored is not None and cfg is not None:
        for fld in fields(StyleGAN2Config):
            given, found = getattr(cfg, fld.name), getattr(stored, fld.name)
            if given != found:
                raise ValueError(f"{path}: config mismatch on stylegan2.{fld.name}: "
                                 f"given {given!r}, file has {found!r}")
    model = StyleGAN2Generator(cfg or stored, seed=0, w_avg_samples=0)

    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [(k, tuple(expected[k].shape), tuple(t.shape)) for k, t in tensors.items()
                  if k in expected and t.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not match the StyleGAN2 architecture:"]
        if missing:
            lines.append(f"  missing keys: {missing}")
        if unexpected:
            lines.append(f"  unexpected keys: {unexpected}")
        lines += [f"  shape mismatch: {k} expected {e} found {s}" for k, e, s in mismatched]
        raise ValueError("\n".join(lines))
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()
