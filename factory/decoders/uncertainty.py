"""Ensemble disagreement: per-pixel Jensen-Shannon divergence and a per-sample score.

DatasetGAN filters generated samples by how much its ensemble of heads disagrees. A pixel's
disagreement is the JS divergence of the heads' class distributions; a sample's score is the mean
over its most uncertain pixels, so a small wrong region is not averaged away by a large easy
background.
"""

from __future__ import annotations

import math

import torch


def _entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy in nats; 0 * log 0 counts as 0 (the clamp only touches zeros' logs)."""
    log = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return -(probs * log).sum(dim)


def js_uncertainty(probs: torch.Tensor, head_dim: int = 0, class_dim: int = 2) -> torch.Tensor:
    """H(mean_i p_i) - mean_i H(p_i) over heads i, in nats, >= 0.

    Works on probabilities, not logits: averaging logits (as the original release did) measures
    something else and can call confident-but-contradicting heads certain. The defaults fit both
    [E, N, K] pixel outputs and [E, B, K, H, W] maps; the result drops the head and class dims.
    """
    if probs.dim() < 2:
        raise ValueError(f"probs needs a head and a class dimension, got shape {tuple(probs.shape)}")
    hd, cd = head_dim % probs.dim(), class_dim % probs.dim()
    if hd == cd:
        raise ValueError(f"head_dim and class_dim must differ, both are {hd}")
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    mean_entropy = _entropy(probs, cd).mean(hd if hd < cd else hd - 1)
    entropy_of_mean = _entropy(probs.mean(hd), cd if cd < hd else cd - 1)
    return (entropy_of_mean - mean_entropy).clamp_min(0.0)


def top_fraction_mean(values: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Per-sample mean of the largest `fraction` of values ([B, H, W] or [B, N] -> [B]).

    The count is ceil(fraction * n) (at least one), so a fraction never rounds down to nothing.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if values.dim() < 2 or values[0].numel() == 0:
        raise ValueError(f"values must be [B, ...] with at least one value per sample, got {tuple(values.shape)}")
    flat = values.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1] - 1e-9))
    return flat.topk(k, dim=1).values.mean(dim=1)
