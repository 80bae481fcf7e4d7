"""Project-then-upsample: the Style Interpreter's first layer on native-resolution feature maps.

The first layer and bilinear upsampling (align_corners=False) are both linear, so
W1 . concat_j(up(S_j)) == sum_j up(W1_j . S_j). Each map is projected to the heads' first hidden
width at its native resolution, and only that small result is upsampled, a band of output rows at a
time, so no full-resolution [B, D, H, W] tensor ever exists.

The plan, made once per call (`ProjectedFeatures.__init__`):
- maps of one size form a group, projected together; one group carries the first layer's bias
  (interpolation keeps constants);
- narrow groups (at most NARROW_WIDTH wide) are projected whole, and upsampled across columns
  together by matmuls with their stacked interpolation weights, which also sums them, in segments of
  COLUMN_SEGMENT output columns that each read only the source columns they need;
- wide groups are projected a few rows ahead of the band (at least PROJECT_PIXELS pixels at a time)
  and upsampled across columns by F.interpolate; a group at the output size is added as it is.
Rows are interpolated by small matmuls with F.interpolate's own weights. Activations are
channels-last ([B, rows, cols, E * hidden]), where upsampling is fastest.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROJECT_PIXELS = 1024
"""Wide maps are projected at least this many pixels at a time (rows ahead of the band)."""
NARROW_WIDTH = 32
"""Maps at most this wide are upsampled across columns together, by matmuls with their stacked
interpolation weights, which also sums them; wider maps go through F.interpolate one by one."""
COLUMN_SEGMENT = 64
"""Those matmuls cover this many output columns each, so each reads only the source columns it needs."""


def source_index(dst: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source rows (or columns) of output positions `dst`, as torch computes them.

    align_corners=False: src = (dst + 0.5) * in/out - 0.5, clamped at 0; returns (i0, i1, lambda)
    with value = (1 - lambda) * x[i0] + lambda * x[i1].
    """
    src = ((dst.to(torch.float32) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0).clamp(0.0, 1.0)


def interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in]: the bilinear weights F.interpolate (align_corners=False) applies along one axis."""
    i0, i1, lam = source_index(torch.arange(out_size), in_size, out_size)
    m = torch.zeros(out_size, in_size)
    m.index_put_((torch.arange(out_size), i0), 1 - lam, accumulate=True)
    return m.index_put_((torch.arange(out_size), i1), lam, accumulate=True)


def source_span(first: int, last: int, in_size: int, out_size: int) -> tuple[int, int]:
    """The source rows (or columns) [a, b) that output positions first..last read."""
    i0, i1, _ = source_index(torch.tensor([first, last]), in_size, out_size)
    return int(i0[0]), int(i1[1]) + 1


@dataclass
class MapGroup:
    """Feature maps of one size, projected together."""

    size: tuple[int, int]
    maps: list[int]
    """Indices into the feature list."""
    weight: torch.Tensor
    """[sum C_j, E * hidden]: the first-layer rows of these maps, all heads side by side."""
    bias: bool
    """Whether this group adds the first layer's bias."""
    rows: torch.Tensor
    """[H, h]: row interpolation weights to the output height."""


@dataclass
class ColumnSegment:
    """Output columns [start, stop) of the narrow groups, upsampled and summed by one matmul."""

    start: int
    stop: int
    spans: list[tuple[int, int]]
    """Per narrow group, the source columns the segment reads."""
    weights: torch.Tensor
    """[stop - start, sum of span widths]: their stacked interpolation weights."""


class ProjectedFeatures:
    """The heads' first-layer pre-activations of maps [B, C_j, h_j, w_j] at the output size, one band
    of rows at a time (`band`)."""

    def __init__(self, features: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                 in_channels: Sequence[int], size: tuple[int, int]) -> None:
        """`weight` [E, D, hidden] and `bias` [E, hidden] are the first layer of every head."""
        self.features, self.bias = features, bias
        self.out_h, self.out_w = size
        self.dtype, self.device = weight.dtype, weight.device
        self.batch, heads, width = features[0].shape[0], weight.shape[0], weight.shape[2]
        self.channels = heads * width
        offsets = [0, *itertools.accumulate(in_channels)]
        by_size: dict[tuple[int, int], list[int]] = {}
        for j, f in enumerate(features):
            by_size.setdefault(tuple(f.shape[-2:]), []).append(j)
        self.narrow: list[tuple[MapGroup, torch.Tensor]] = []  # with the whole group projected
        self.wide: list[MapGroup] = []
        order = sorted(by_size, key=lambda hw: (hw == size, hw[1], hw[0]))  # the output size last
        for i, hw in enumerate(order):
            maps = by_size[hw]
            group_weight = torch.cat([weight[:, offsets[j]: offsets[j + 1]].permute(1, 0, 2).reshape(-1, self.channels)
                                      for j in maps])
            rows = interpolation_matrix(hw[0], self.out_h).to(self.device, self.dtype)
            group = MapGroup(hw, maps, group_weight, i == 0, rows)
            if hw[1] <= NARROW_WIDTH and hw != size:
                self.narrow.append((group, self.project(group, 0, hw[0]).flatten(2)))
            else:
                self.wide.append(group)
        self.segments = self._column_segments()
        self._cache: dict[int, tuple[int, torch.Tensor]] = {}

    def _column_segments(self) -> list[ColumnSegment]:
        segments = []
        for start in range(0, self.out_w, COLUMN_SEGMENT) if self.narrow else []:
            stop = min(self.out_w, start + COLUMN_SEGMENT)
            spans, mats = [], []
            for group, _ in self.narrow:
                a, b = source_span(start, stop - 1, group.size[1], self.out_w)
                spans.append((a, b))
                mats.append(interpolation_matrix(group.size[1], self.out_w)[start:stop, a:b])
            segments.append(ColumnSegment(start, stop, spans, torch.cat(mats, 1).to(self.device, self.dtype)))
        return segments

    def pixels(self, group: MapGroup, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of the group's maps as pixel vectors [B * rows * w, sum C_j]."""
        maps = group.maps
        x = (torch.cat([self.features[j][:, :, lo:hi] for j in maps], 1) if len(maps) > 1
             else self.features[maps[0]][:, :, lo:hi])
        return x.to(self.dtype).permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def project(self, group: MapGroup, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of the group projected: [B, rows, w, E * hidden]."""
        x = self.pixels(group, lo, hi)
        y = torch.addmm(self.bias.reshape(-1), x, group.weight) if group.bias else x @ group.weight
        return y.view(self.batch, hi - lo, -1, self.channels)

    def projected_rows(self, k: int, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi of wide group k projected. Rows are projected once, a few bands' worth at a
        time (at least PROJECT_PIXELS pixels, so the matmuls stay efficient)."""
        group = self.wide[k]
        h, w = group.size
        prev_lo, prev = self._cache.get(k, (lo, None))
        start = lo
        if prev is not None and prev_lo <= lo < prev_lo + prev.shape[1]:
            start = min(prev_lo + prev.shape[1], hi)
        parts = [prev[:, lo - prev_lo:]] if start > lo else []
        if hi > start:
            end = min(h, max(hi, start - (-PROJECT_PIXELS // (self.batch * w))))
            parts.append(self.project(group, start, end))
        self._cache[k] = (lo, torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        return self._cache[k][1][:, : hi - lo]

    def _narrow_band(self, r0: int, r1: int) -> torch.Tensor:
        """The narrow groups upsampled to output rows r0:r1 and summed: [B, rows, W, E * hidden]."""
        acc = torch.empty(self.batch, r1 - r0, self.out_w, self.channels, dtype=self.dtype, device=self.device)
        rows_up = [torch.matmul(group.rows[r0:r1], whole).view(self.batch, r1 - r0, group.size[1], self.channels)
                   for group, whole in self.narrow]
        for seg in self.segments:
            stacked = torch.cat([r[:, :, a:b] for r, (a, b) in zip(rows_up, seg.spans)], dim=2)
            torch.matmul(seg.weights, stacked, out=acc[:, :, seg.start:seg.stop])
        return acc

    def band(self, r0: int, r1: int) -> torch.Tensor:
        """First-layer pre-activations of output rows r0:r1: [B, rows, W, E * hidden]."""
        acc = self._narrow_band(r0, r1) if self.narrow else None
        for k, group in enumerate(self.wide):
            h, w = group.size
            if (h, w) == (self.out_h, self.out_w):
                if acc is None:
                    acc = self.project(group, r0, r1)
                else:
                    acc.view(-1, self.channels).addmm_(self.pixels(group, r0, r1), group.weight)
                continue
            lo, hi = source_span(r0, r1 - 1, h, self.out_h)
            p = self.projected_rows(k, lo, hi)
            p = torch.matmul(group.rows[r0:r1, lo:hi], p.flatten(2)).view(self.batch, r1 - r0, w, self.channels)
            if w != self.out_w:
                p = F.interpolate(p.permute(0, 3, 1, 2), size=(r1 - r0, self.out_w), mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            acc = p.contiguous() if acc is None else acc.add_(p)
        return acc
