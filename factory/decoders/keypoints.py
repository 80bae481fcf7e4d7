"""Keypoints as Gaussian heatmaps, and back.

Coordinate convention: a keypoint (x, y) is in pixel-index units, the centre of pixel (row i,
column j) being (x=j, y=i), so pixel j spans [j - 0.5, j + 0.5). A keypoint on a pixel centre
(integer x, y) is encoded as a heatmap peaking at exactly 1 on that pixel and decodes back to the
same integers. Annotation tools that use continuous coordinates (pixel j spanning [j, j + 1))
should subtract 0.5 before encoding.
"""

from __future__ import annotations

import torch


def gaussian_heatmaps(keypoints: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """[N, K, 3] (x, y, visibility) -> [N, K, H, W] in [0, 1]; all zero where visibility == 0."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if keypoints.dim() != 3 or keypoints.shape[-1] != 3:
        raise ValueError(f"keypoints must be [N, K, 3] (x, y, visibility), got {tuple(keypoints.shape)}")
    kp = keypoints.float()
    h, w = size
    grid_x = torch.arange(w, dtype=torch.float32, device=kp.device)
    grid_y = torch.arange(h, dtype=torch.float32, device=kp.device)
    gx = torch.exp(-((grid_x - kp[..., 0:1]) ** 2) / (2 * sigma**2))
    gy = torch.exp(-((grid_y - kp[..., 1:2]) ** 2) / (2 * sigma**2))
    heat = gy[..., :, None] * gx[..., None, :]
    visible = (kp[..., 2] > 0)[..., None, None]
    return torch.where(visible, heat, torch.zeros((), device=kp.device))


def _peak_offset(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through three samples, on log values where all are positive.

    A Gaussian's log is a parabola, so on a clean heatmap this recovers the sub-pixel centre
    exactly; equal neighbours give exactly 0, so on-grid keypoints decode to exact integers.
    """
    positive = (left > 0) & (centre > 0) & (right > 0)
    tiny = torch.finfo(centre.dtype).tiny
    a = torch.where(positive, left.clamp_min(tiny).log(), left)
    b = torch.where(positive, centre.clamp_min(tiny).log(), centre)
    c = torch.where(positive, right.clamp_min(tiny).log(), right)
    curvature = a - 2 * b + c
    safe = torch.where(curvature < 0, curvature, torch.ones_like(curvature))
    offset = torch.where(curvature < 0, (a - c) / (2 * safe), torch.zeros_like(curvature))
    return offset.clamp(-0.5, 0.5)


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] -> [B, K, 3] (x, y, score): the peak pixel, refined sub-pixel; score = peak value.

    Refinement uses the peak's row and column neighbours; on an image border it is skipped
    along that axis.
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be [B, K, H, W], got {tuple(heatmaps.shape)}")
    maps = heatmaps.float()
    b, k, h, w = maps.shape
    flat = maps.flatten(2)
    score, index = flat.max(dim=2)
    py, px = index // w, index % w

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(2, (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).unsqueeze(2)).squeeze(2)

    dx = _peak_offset(at(py, px - 1), score, at(py, px + 1))
    dy = _peak_offset(at(py - 1, px), score, at(py + 1, px))
    dx = torch.where((px > 0) & (px < w - 1), dx, torch.zeros_like(dx))
    dy = torch.where((py > 0) & (py < h - 1), dy, torch.zeros_like(dy))
    return torch.stack([px + dx, py + dy, score], dim=-1)
