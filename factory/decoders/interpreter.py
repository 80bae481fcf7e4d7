"""The Style Interpreter: DatasetGAN's ensemble of pixel MLPs, as one batched module.

A pixel's feature is the concatenation of every backbone feature map, bilinearly upsampled
(align_corners=False) to the image size. Each head is Linear-ReLU-BatchNorm1d (per hidden width)
then Linear. All heads' weights live in shared tensors ([E, in, out]) so the ensemble runs as
batched matmuls, never as a loop over models.

Inference uses project-then-upsample: the first layer and bilinear upsampling are both linear, so
W1 . concat_j(up(S_j)) == sum_j up(W1_j . S_j). Each map is projected to the heads' first hidden
width at its native resolution, and only that small result is upsampled. Output rows are
processed in bands so no full-resolution [B, D, H, W] tensor, nor even a full-resolution hidden
activation of all heads, ever exists.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.decoders.keypoints import decode_heatmaps
from factory.decoders.uncertainty import js_uncertainty, top_fraction_mean

BAND_ELEMENTS = 1 << 21
"""Default bound on one band's first-layer activations (elements); it bounds peak memory."""
PROJECT_PIXELS = 1024
"""Wide maps are projected at least this many pixels at a time (rows ahead of the band)."""
NARROW_WIDTH = 32
"""Maps at most this wide are upsampled across columns together, by matmuls with their stacked
interpolation weights, which also sums them; wider maps go through F.interpolate one by one."""
COLUMN_SEGMENT = 64
"""Those matmuls cover this many output columns each, so each reads only the source columns it needs."""


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


def _source_index(dst: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source rows (or columns) of output positions `dst`, as torch computes them.

    align_corners=False: src = (dst + 0.5) * in/out - 0.5, clamped at 0; returns (i0, i1, lambda)
    with value = (1 - lambda) * x[i0] + lambda * x[i1].
    """
    src = ((dst.to(torch.float32) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0).clamp(0.0, 1.0)


def _interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in]: the bilinear weights F.interpolate (align_corners=False) applies along one axis."""
    i0, i1, lam = _source_index(torch.arange(out_size), in_size, out_size)
    m = torch.zeros(out_size, in_size)
    m.index_put_((torch.arange(out_size), i0), 1 - lam, accumulate=True)
    return m.index_put_((torch.arange(out_size), i1), lam, accumulate=True)


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
        y0, y1, ly = _source_index(ys, h, out_h)
        x0, x1, lx = _source_index(xs, w, out_w)
        ly, lx = ly.to(f.dtype)[:, None], lx.to(f.dtype)[:, None]
        top = torch.lerp(f[batch_index, :, y0, x0], f[batch_index, :, y0, x1], lx)
        bottom = torch.lerp(f[batch_index, :, y1, x0], f[batch_index, :, y1, x1], lx)
        parts.append(torch.lerp(top, bottom, ly))
    return torch.cat(parts, dim=1)


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

    @property
    def in_features(self) -> int:
        return sum(self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel vectors [N, D] (shared by all heads) or [E, N, D] (one set per head) -> [E, N, K]."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features or (x.dim() == 3 and x.shape[0] != self.num_heads):
            raise ValueError(
                f"expected [N, {self.in_features}] or [{self.num_heads}, N, {self.in_features}], got {tuple(x.shape)}"
            )
        x = x.to(self.linears[0].weight.dtype)
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
        """Layers 2.. as (weight [E, out, in], bias [E, out, 1]) with the preceding eval BN folded in,
        to apply to channel-major activations [E, in, pixels]."""
        layers = []
        for norm, linear in zip(self.norms, self.linears[1:]):
            scale, shift = norm.affine()
            weight = linear.weight * scale[:, :, None]
            bias = linear.bias + torch.einsum("ei,eio->eo", shift, linear.weight)
            layers.append((weight.transpose(1, 2).contiguous(), bias[:, :, None]))
        return layers

    @torch.no_grad()
    def forward_maps(
        self, features: Sequence[torch.Tensor], size: tuple[int, int], band_elements: int = BAND_ELEMENTS
    ) -> torch.Tensor:
        """Native-resolution maps [B, C_j, h_j, w_j] -> logits [E, B, K, H, W], project-then-upsample.

        Inference only: eval mode (BatchNorm is folded into the next layer), no gradients. Maps of
        one size are projected together. Output rows are processed in bands whose first-layer
        activations hold about `band_elements` values, which bounds peak memory whatever the image
        size; wide maps are projected a few rows ahead of the band, narrow ones once. Upsampling is
        separable and uses F.interpolate's own weights: rows by a small matmul, columns by
        F.interpolate (wide maps) or by matmuls that also sum all narrow maps. Activations are
        channels-last ([B, rows, cols, E * hidden]), where upsampling is fastest.
        """
        self._check_maps(features, "forward_maps")
        out_h, out_w = size
        first = self.linears[0]
        dtype, device = first.weight.dtype, first.weight.device
        batch, heads, width = features[0].shape[0], self.num_heads, self.hidden[0]
        channels = heads * width
        offsets = [0, *itertools.accumulate(self.in_channels)]
        by_size: dict[tuple[int, int], list[int]] = {}
        for j, f in enumerate(features):
            by_size.setdefault(tuple(f.shape[-2:]), []).append(j)

        def weight(js: list[int]) -> torch.Tensor:
            """First-layer rows of maps js, all heads side by side: [sum C_j, E * hidden]."""
            return torch.cat([first.weight[:, offsets[j] : offsets[j + 1]].permute(1, 0, 2).reshape(-1, channels)
                              for j in js])

        def pixels(js: list[int], lo: int, hi: int) -> torch.Tensor:
            """Rows lo:hi of maps js as pixel vectors [B * rows * w, sum C_j]."""
            x = torch.cat([features[j][:, :, lo:hi] for j in js], 1) if len(js) > 1 else features[js[0]][:, :, lo:hi]
            return x.to(dtype).permute(0, 2, 3, 1).reshape(-1, x.shape[1])

        def project(js: list[int], w1: torch.Tensor, lo: int, hi: int, bias: bool) -> torch.Tensor:
            """[B, rows, w, E * hidden]. The bias goes into one group only: interpolation keeps constants."""
            x = pixels(js, lo, hi)
            y = torch.addmm(first.bias.reshape(-1), x, w1) if bias else x @ w1
            return y.view(batch, hi - lo, -1, channels)

        def row_weights(h: int) -> torch.Tensor:
            """[H, h]: rows are interpolated by a small matmul, one pass instead of gather-and-lerp."""
            return _interpolation_matrix(h, out_h).to(device, dtype)

        narrow: list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]] = []  # (size, projection, row weights)
        wide: list[tuple[tuple[int, int], list[int], torch.Tensor, bool, torch.Tensor]] = []  # (.., weights, bias, ..)
        for i, hw in enumerate(sorted(by_size, key=lambda hw: (hw == (out_h, out_w), hw[1], hw[0]))):
            js = by_size[hw]
            if hw[1] <= NARROW_WIDTH and hw != (out_h, out_w):
                narrow.append((hw, project(js, weight(js), 0, hw[0], i == 0).flatten(2), row_weights(hw[0])))
            else:
                wide.append((hw, js, weight(js), i == 0, row_weights(hw[0])))
        segments = []  # (first output column, last + 1, [(source column range) per narrow map], weights)
        for x0 in range(0, out_w, COLUMN_SEGMENT) if narrow else []:
            x1 = min(out_w, x0 + COLUMN_SEGMENT)
            ranges, mats = [], []
            for (_, w), _, _ in narrow:
                i0, i1, _ = _source_index(torch.tensor([x0, x1 - 1]), w, out_w)
                a, b = int(i0[0]), int(i1[1]) + 1
                ranges.append((a, b))
                mats.append(_interpolation_matrix(w, out_w)[x0:x1, a:b])
            segments.append((x0, x1, ranges, torch.cat(mats, 1).to(device, dtype)))
        cache: dict[int, tuple[int, torch.Tensor]] = {}

        def projected_rows(k: int, lo: int, hi: int) -> torch.Tensor:
            """Rows lo:hi of wide group k projected. Rows are projected once, a few bands' worth
            at a time (at least PROJECT_PIXELS pixels, so the matmuls stay efficient)."""
            (h, w), js, w1, bias, _ = wide[k]
            prev_lo, prev = cache.get(k, (lo, None))
            start = lo
            if prev is not None and prev_lo <= lo < prev_lo + prev.shape[1]:
                start = min(prev_lo + prev.shape[1], hi)
            parts = [prev[:, lo - prev_lo :]] if start > lo else []
            if hi > start:
                end = min(h, max(hi, start - (-PROJECT_PIXELS // (batch * w))))
                parts.append(project(js, w1, start, end, bias))
            cache[k] = (lo, torch.cat(parts, 1) if len(parts) > 1 else parts[0])
            return cache[k][1][:, : hi - lo]

        layers = self._folded_layers()
        out = torch.empty(heads, batch, self.num_outputs, out_h, out_w, dtype=dtype, device=device)
        rows = max(1, band_elements // (batch * channels * out_w))
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            acc = None
            if narrow:
                acc = torch.empty(batch, r1 - r0, out_w, channels, dtype=dtype, device=device)
                rows_up = [torch.matmul(ry[r0:r1], whole).view(batch, r1 - r0, w, channels)
                           for (_, w), whole, ry in narrow]
                for x0, x1, ranges, cols in segments:  # upsample and sum the narrow maps' columns
                    stacked = torch.cat([r[:, :, a:b] for r, (a, b) in zip(rows_up, ranges)], dim=2)
                    torch.matmul(cols, stacked, out=acc[:, :, x0:x1])
            for k, ((h, w), js, w1, bias, ry) in enumerate(wide):
                if (h, w) == (out_h, out_w):
                    if acc is None:
                        acc = project(js, w1, r0, r1, bias)
                    else:
                        acc.view(-1, channels).addmm_(pixels(js, r0, r1), w1)
                    continue
                y0, y1, _ = _source_index(torch.tensor([r0, r1 - 1]), h, out_h)
                lo, hi = int(y0[0]), int(y1[1]) + 1
                p = projected_rows(k, lo, hi)
                p = torch.matmul(ry[r0:r1, lo:hi], p.flatten(2)).view(batch, r1 - r0, w, channels)
                if w != out_w:
                    p = F.interpolate(p.permute(0, 3, 1, 2), size=(r1 - r0, out_w), mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1)
                acc = p.contiguous() if acc is None else acc.add_(p)
            z = acc.relu_().view(-1, heads, width).permute(1, 2, 0)  # [E, hidden, pixels]
            for n, (w_n, b_n) in enumerate(layers):
                z = torch.baddbmm(b_n, w_n, z)
                if n < len(layers) - 1:
                    z = z.relu_()
            out[:, :, :, r0:r1] = z.view(heads, self.num_outputs, batch, r1 - r0, out_w).transpose(1, 2)
        return out

    def forward_maps_naive(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The reference for forward_maps: upsample every map, concatenate [B, D, H, W], run per pixel."""
        self._check_maps(features, "forward_maps_naive")
        batch, (out_h, out_w) = features[0].shape[0], size
        x = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features], 1)
        pixels = x.permute(0, 2, 3, 1).reshape(-1, self.in_features)
        del x
        logits = self.forward(pixels)
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
