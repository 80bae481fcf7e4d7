"""The Style Interpreter: DatasetGAN's ensemble of pixel MLPs, as one batched module.

A pixel's feature is the concatenation of every backbone feature map, bilinearly upsampled
(align_corners=False) to the image size, each channel shifted and scaled by its mean and standard
deviation over the labeled training images (`feature_stats`, fixed before training and stored with
the decoder; identity until set). Each head is Linear-ReLU-BatchNorm1d (per hidden width) then
Linear. All heads' weights live in shared tensors ([E, in, out]) so the ensemble runs as
batched matmuls, never as a loop over models. At inference every head's logits are shifted by
`logit_offset` ([K], `prior_offset`: a power of the training labels' class frequencies, since heads
trained on class-balanced pixels treat every class as equally likely; zero until set).

Inference uses project-then-upsample (`factory.decoders.projection`): the first layer and bilinear
upsampling are both linear, so W1 . concat_j(up(S_j)) == sum_j up(W1_j . S_j). Each map is projected
to the heads' first hidden width at its native resolution, and only that small result is upsampled.
Output rows are processed in bands so no full-resolution [B, D, H, W] tensor, nor even a
full-resolution hidden activation of all heads, ever exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.decoders.keypoints import decode_heatmaps
from factory.decoders.projection import ProjectedFeatures, source_index
from factory.decoders.uncertainty import js_uncertainty, top_fraction_mean

BAND_ELEMENTS = 1 << 21
"""Default bound on one band's first-layer activations (elements); it bounds peak memory."""


def default_hidden(num_outputs: int) -> tuple[int, int]:
    """The paper's widths: (128, 32), or (256, 128) once there are 32 or more outputs."""
    return (256, 128) if num_outputs >= 32 else (128, 32)


class HeadsLinear(nn.Module):
    """One Linear layer per head, stored as weight [E, in, out] and bias [E, out].

    Initialised as in the DatasetGAN release (weights N(0, 0.02), bias 0), drawn from the given
    generator so every head differs and the whole ensemble is a function of the seed.
    """

    def __init__(self, heads: int, in_features: int, out_features: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, in_features, out_features, generator=generator) * 0.02)
        self.bias = nn.Parameter(torch.zeros(heads, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in] (shared by all heads) or [E, N, in] -> [E, N, out]."""
        if x.dim() == 2:
            return torch.einsum("ni,eio->eno", x, self.weight) + self.bias[:, None, :]
        return torch.baddbmm(self.bias[:, None, :], x, self.weight)


class HeadsBatchNorm(nn.Module):
    """BatchNorm1d per head and channel, with torch's semantics (F.batch_norm over E*C channels).

    Training normalises with batch statistics and updates the running ones (momentum 0.1,
    unbiased variance); eval uses the running statistics.
    """

    def __init__(self, heads: int, channels: int, generator: torch.Generator, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(1.0 + 0.02 * torch.randn(heads, channels, generator=generator))
        self.bias = nn.Parameter(torch.zeros(heads, channels))
        self.register_buffer("running_mean", torch.zeros(heads, channels))
        self.register_buffer("running_var", torch.ones(heads, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[E, N, C] -> [E, N, C]."""
        e, n, c = x.shape
        flat = x.transpose(0, 1).reshape(n, e * c)
        y = F.batch_norm(
            flat, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
            self.bias.view(-1), self.training, self.momentum, self.eps,
        )
        return y.view(n, e, c).transpose(0, 1)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode BN as y = x * scale + shift, both [E, C]."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


def gather_pixel_features(
    features: Sequence[torch.Tensor], batch_index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """[N, D]: the upsampled-and-concatenated feature vectors of pixels (batch_index, ys, xs).

    Equal to upsample(align_corners=False) + concat + index, but only the sampled pixels are
    interpolated, so training never builds a full-resolution feature tensor.
    """
    out_h, out_w = size
    parts = []
    for f in features:
        h, w = f.shape[-2:]
        y0, y1, ly = source_index(ys, h, out_h)
        x0, x1, lx = source_index(xs, w, out_w)
        ly, lx = ly.to(f.dtype)[:, None], lx.to(f.dtype)[:, None]
        top = torch.lerp(f[batch_index, :, y0, x0], f[batch_index, :, y0, x1], lx)
        bottom = torch.lerp(f[batch_index, :, y1, x0], f[batch_index, :, y1, x1], lx)
        parts.append(torch.lerp(top, bottom, ly))
    return torch.cat(parts, dim=1)


def feature_stats(features: Sequence[torch.Tensor], index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation [D] of every channel of maps [N, C_j, h_j, w_j] over images
    `index` and their positions (at each map's own resolution), concatenated in map order: what
    `StyleInterpreter.standardize` takes. A constant channel gets std 1 (it is only shifted).
    Two passes, one image at a time in float64, so no copy of all the maps is made (16 images of a
    1024 px generator's last block are 2 GB in float32)."""
    if not len(index):
        raise ValueError("feature_stats needs at least one image")
    means, stds = [], []
    for f in features:
        count = len(index) * f.shape[-2] * f.shape[-1]
        sums, peaks = [], []
        for i in index:  # pass 1: sums and the largest magnitude
            x = f[i].double()
            sums.append(x.sum((1, 2)))
            peaks.append(x.abs().amax((1, 2)))
        mean, peak = torch.stack(sums).sum(0) / count, torch.stack(peaks).amax(0)
        var = sum((f[i].double() - mean[:, None, None]).square().sum((1, 2)) for i in index) / count  # pass 2
        std = var.sqrt()
        means.append(mean)
        stds.append(torch.where(std > 1e-6 * peak.clamp_min(1e-12), std, torch.ones_like(std)))
    return torch.cat(means).float(), torch.cat(stds).float()


def prior_offset(counts: torch.Tensor, power: float) -> torch.Tensor:
    """[K] logit offset `power * log(prior)` for heads trained on class-balanced pixels (logit
    adjustment, Menon et al. 2021): the prior is the classes' pixel frequencies in the training
    labels (`counts`, [K]), add-one smoothed so a class absent from them gets a finite offset."""
    if counts.dim() != 1 or bool((counts < 0).any()) or power < 0:
        raise ValueError(f"prior_offset needs [K] counts >= 0 and a power >= 0, got {tuple(counts.shape)}, {power}")
    counts = counts.double()
    prior = (counts + 1) / (counts.sum() + len(counts))
    return (power * prior.log()).float()


class StyleInterpreter(nn.Module):
    """An ensemble of `num_heads` pixel MLPs over `sum(in_channels)`-dim pixel features."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_outputs: int,
        num_heads: int = 10,
        hidden: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        hidden = tuple(default_hidden(num_outputs) if hidden is None else hidden)
        if not in_channels or min(in_channels) < 1:
            raise ValueError(f"in_channels must be positive channel counts, got {list(in_channels)}")
        if num_outputs < 1 or num_heads < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"need num_outputs, num_heads and hidden widths >= 1, got "
                             f"{num_outputs}, {num_heads}, {list(hidden)}")
        self.in_channels = [int(c) for c in in_channels]
        self.num_outputs, self.num_heads, self.hidden = num_outputs, num_heads, hidden
        generator = torch.Generator().manual_seed(seed)
        widths = [sum(self.in_channels), *hidden, num_outputs]
        self.linears = nn.ModuleList(
            HeadsLinear(num_heads, a, b, generator) for a, b in zip(widths[:-1], widths[1:])
        )
        self.norms = nn.ModuleList(HeadsBatchNorm(num_heads, c, generator) for c in hidden)
        self.register_buffer("feature_mean", torch.zeros(self.in_features))
        self.register_buffer("feature_std", torch.ones(self.in_features))
        self.register_buffer("logit_offset", torch.zeros(num_outputs))

    def standardize(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Shift and scale every input channel by `mean` and `std` ([D] each, `feature_stats`) from now
        on; set once, before training (the statistics are part of the model and its file)."""
        if mean.shape != (self.in_features,) or std.shape != (self.in_features,) or bool((std <= 0).any()):
            raise ValueError(f"standardize needs mean and std of shape [{self.in_features}] with std > 0, got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def offset_logits(self, offset: torch.Tensor) -> None:
        """Add `offset` ([K], `prior_offset`) to every head's logits at inference (`forward_maps`,
        `forward_maps_naive`; `forward`, the training path, stays raw); set once, before training."""
        if offset.shape != (self.num_outputs,) or not bool(torch.isfinite(offset).all()):
            raise ValueError(f"offset_logits needs a finite offset of shape [{self.num_outputs}], got "
                             f"{tuple(offset.shape)}")
        self.logit_offset.copy_(offset)

    def _first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer with the input standardisation folded in: weight [E, D, hidden], bias [E, hidden]."""
        first = self.linears[0]
        weight = first.weight / self.feature_std[None, :, None]
        bias = first.bias - torch.einsum("d,edo->eo", self.feature_mean, weight)
        return weight, bias

    @property
    def in_features(self) -> int:
        return sum(self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel vectors [N, D] (shared by all heads) or [E, N, D] (one set per head) -> [E, N, K]."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features or (x.dim() == 3 and x.shape[0] != self.num_heads):
            raise ValueError(
                f"expected [N, {self.in_features}] or [{self.num_heads}, N, {self.in_features}], got {tuple(x.shape)}"
            )
        x = (x.to(self.linears[0].weight.dtype) - self.feature_mean) / self.feature_std
        for linear, norm in zip(self.linears, self.norms):
            x = norm(F.relu(linear(x)))
        return self.linears[-1](x)

    def _check_maps(self, features: Sequence[torch.Tensor], method: str) -> None:
        if self.training:
            raise RuntimeError(
                f"StyleInterpreter.{method} needs eval mode (call .eval()): BatchNorm would otherwise "
                "need batch statistics over whole maps; train on sampled pixels with forward()"
            )
        channels = [f.shape[1] if f.dim() == 4 else None for f in features]
        if channels != self.in_channels or len({f.shape[0] for f in features}) != 1:
            raise ValueError(
                f"features must be [B, C_j, h_j, w_j] maps with channels {self.in_channels} and one batch "
                f"size, got shapes {[tuple(f.shape) for f in features]}"
            )

    def _folded_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Layers 2.. as (weight [E, out, in], bias [E, out, 1]) with the preceding eval BN folded in
        (and `logit_offset` in the output layer's bias), to apply to channel-major activations
        [E, in, pixels]."""
        layers = []
        for norm, linear in zip(self.norms, self.linears[1:]):
            scale, shift = norm.affine()
            weight = linear.weight * scale[:, :, None]
            bias = linear.bias + torch.einsum("ei,eio->eo", shift, linear.weight)
            layers.append((weight.transpose(1, 2).contiguous(), bias[:, :, None]))
        weight, bias = layers[-1]  # the output layer: the inference offset joins its bias
        layers[-1] = (weight, bias + self.logit_offset[None, :, None])
        return layers

    @torch.no_grad()
    def forward_maps(
        self, features: Sequence[torch.Tensor], size: tuple[int, int], band_elements: int = BAND_ELEMENTS
    ) -> torch.Tensor:
        """Native-resolution maps [B, C_j, h_j, w_j] -> logits [E, B, K, H, W], project-then-upsample
        (`factory.decoders.projection`).

        Inference only: eval mode (BatchNorm is folded into the next layer), no gradients. Output rows
        are processed in bands whose first-layer activations hold about `band_elements` values, which
        bounds peak memory whatever the image size.
        """
        self._check_maps(features, "forward_maps")
        out_h, out_w = size
        weight, bias = self._first_layer()
        batch, heads, width = features[0].shape[0], self.num_heads, self.hidden[0]
        projected = ProjectedFeatures(features, weight, bias, self.in_channels, size)
        layers = self._folded_layers()
        out = torch.empty(heads, batch, self.num_outputs, out_h, out_w, dtype=weight.dtype, device=weight.device)
        rows = max(1, band_elements // (batch * heads * width * out_w))
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            out[:, :, :, r0:r1] = self._later_layers(projected.band(r0, r1), layers, r1 - r0, out_w)
        return out

    def _later_layers(self, first: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], rows: int,
                      cols: int) -> torch.Tensor:
        """First-layer pre-activations [B, rows, W, E * hidden] -> logits [E, B, K, rows, W]."""
        batch = first.shape[0]
        z = first.relu_().view(-1, self.num_heads, self.hidden[0]).permute(1, 2, 0)  # [E, hidden, pixels]
        for n, (w_n, b_n) in enumerate(layers):
            z = torch.baddbmm(b_n, w_n, z)
            if n < len(layers) - 1:
                z = z.relu_()
        return z.view(self.num_heads, self.num_outputs, batch, rows, cols).transpose(1, 2)

    def forward_maps_naive(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The reference for forward_maps: upsample every map, concatenate [B, D, H, W], run per pixel."""
        self._check_maps(features, "forward_maps_naive")
        batch, (out_h, out_w) = features[0].shape[0], size
        x = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features], 1)
        pixels = x.permute(0, 2, 3, 1).reshape(-1, self.in_features)
        del x
        logits = self.forward(pixels) + self.logit_offset
        return logits.view(self.num_heads, batch, out_h, out_w, self.num_outputs).permute(0, 1, 4, 2, 3)


@dataclass
class SegmentationPrediction:
    labels: torch.Tensor
    """[B, H, W] int64: argmax of the heads' mean class probabilities."""
    pixel_uncertainty: torch.Tensor
    """[B, H, W] float: Jensen-Shannon divergence between the heads' class probabilities."""
    score: torch.Tensor
    """[B] float: mean of the most uncertain `top_fraction` of pixels."""


@dataclass
class KeypointPrediction:
    keypoints: torch.Tensor
    """[B, K, 3] float (x, y, score), decoded from the heads' mean heatmaps (pixel-index units)."""
    pixel_uncertainty: torch.Tensor
    """[B, H, W] float: the heads' standard deviation per heatmap, max over keypoints."""
    score: torch.Tensor
    """[B] float: mean of the most uncertain `top_fraction` of pixels."""


def _require_eval(model: StyleInterpreter) -> None:
    if model.training:
        raise RuntimeError("predictions need the decoder in eval mode (call model.eval())")


def predict_segmentation(
    model: StyleInterpreter, features: Sequence[torch.Tensor], size: tuple[int, int], top_fraction: float = 0.1
) -> SegmentationPrediction:
    """Labels, per-pixel JS uncertainty and per-sample score. Heads vote with probabilities
    (mean of softmaxes), not logits, matching the uncertainty measure."""
    _require_eval(model)
    with torch.inference_mode():
        probs = model.forward_maps(features, size).softmax(dim=2)
        labels = probs.mean(dim=0).argmax(dim=1)
        uncertainty = js_uncertainty(probs, head_dim=0, class_dim=2)
        return SegmentationPrediction(labels, uncertainty, top_fraction_mean(uncertainty, top_fraction))


def predict_keypoints(
    model: StyleInterpreter, features: Sequence[torch.Tensor], size: tuple[int, int], top_fraction: float = 0.1
) -> KeypointPrediction:
    """Keypoints from the mean heatmap, with the heads' disagreement as uncertainty.

    JS divergence is defined for class probabilities; heatmaps are regressed values, so the
    ensemble's standard deviation (population, so one head gives 0) is its regression analogue.
    """
    _require_eval(model)
    with torch.inference_mode():
        heat = model.forward_maps(features, size)
        keypoints = decode_heatmaps(heat.mean(dim=0))
        uncertainty = heat.std(dim=0, correction=0).amax(dim=1)
        return KeypointPrediction(keypoints, uncertainty, top_fraction_mean(uncertainty, top_fraction))
