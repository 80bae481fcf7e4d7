"""Decoders: backbone features -> labels, plus an uncertainty score per pixel and per sample.

The contract: `build_decoder(cfg, in_channels, ...)` makes an untrained one; a `FittedDecoder`
(loaded by `factory.decoders.files.load_decoder`) is called as `decoder(features, size) -> Decoded`
whatever its kind. Pure PyTorch: no Ray, no storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from factory.config import DecoderConfig
from factory.decoders.interpreter import StyleInterpreter, predict_keypoints, predict_segmentation
from factory.decoders.perception import PerceptionDecoder, predict


@dataclass
class Decoded:
    masks: torch.Tensor | None
    """[B, H, W] uint8 class ids (segmentation), else None."""
    keypoints: torch.Tensor | None
    """[B, K, 3] float (x, y, score) in pixels (keypoints), else None."""
    pixel_uncertainty: torch.Tensor
    """[B, H, W] float32."""
    score: torch.Tensor
    """[B] float32: mean of the most uncertain pixels."""
    depth: torch.Tensor | None = None
    """[B, H, W] float32 metres (perception decoder with the depth task), else None."""
    instance_map: torch.Tensor | None = None
    """[B, H, W] int64 instance ids, 0 where none (instances task), else None."""
    instances: list[list[dict]] | None = None
    """Per sample [{"id", "class", "score"}] for the ids in `instance_map` (instances task)."""


@dataclass
class FittedDecoder:
    model: StyleInterpreter | PerceptionDecoder
    cfg: DecoderConfig
    label_names: list[str]
    """What its outputs are called: the classes (an interpreter fitted for keypoints: the keypoints)."""
    in_channels: list[int]
    backbone_hash: str
    keypoint_names: list[str]
    """The keypoints it predicts, in the order of `Decoded.keypoints` ([] when it predicts none)."""

    @torch.inference_mode()
    def __call__(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> Decoded:
        """Labels of a batch. Features in half precision on a GPU (a bf16/fp16 backbone) run the
        decoder under autocast in that dtype; the outputs reach the CPU together, in one wait."""
        half = features[0].dtype in (torch.float16, torch.bfloat16) and features[0].device.type == "cuda"
        with torch.autocast("cuda", dtype=features[0].dtype, enabled=half):
            out, instances = self._predict(features, size)
        return Decoded(**to_host(out), instances=instances)

    def _predict(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> tuple[dict, list | None]:
        top = self.cfg.uncertainty_top_fraction
        if self.cfg.kind == "perception":
            p = predict(self.model, features, size, top, self.cfg.instance_threshold)
            b = features[0].shape[0]
            uncertainty = p.pixel_uncertainty if p.pixel_uncertainty is not None else torch.zeros(b, *size)
            return {"masks": p.masks.to(torch.uint8) if p.masks is not None else None,
                    "keypoints": p.keypoints.float() if p.keypoints is not None else None,
                    "pixel_uncertainty": uncertainty.float(), "score": p.score.float(),
                    "depth": p.depth.float() if p.depth is not None else None,
                    "instance_map": p.instance_map}, p.instances
        if self.cfg.task == "segmentation":
            p = predict_segmentation(self.model, features, size, top)
            return {"masks": p.labels.to(torch.uint8), "keypoints": None,
                    "pixel_uncertainty": p.pixel_uncertainty.float(), "score": p.score.float()}, None
        p = predict_keypoints(self.model, features, size, top)
        return {"masks": None, "keypoints": p.keypoints.float(), "pixel_uncertainty": p.pixel_uncertainty.float(),
                "score": p.score.float()}, None


def to_host(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """Device tensors -> CPU tensors. On a GPU each is copied asynchronously into pinned memory and
    the host waits once for all of them, instead of once per tensor."""
    on_gpu = [t for t in tensors.values() if t is not None and t.device.type == "cuda"]
    if not on_gpu:
        return {k: None if t is None else t.cpu() for k, t in tensors.items()}
    out = {}
    for k, t in tensors.items():
        if t is None or t.device.type != "cuda":
            out[k] = t
        else:
            out[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    torch.cuda.synchronize(on_gpu[0].device)
    return out


def build_decoder(cfg: DecoderConfig, in_channels: Sequence[int], num_outputs: int,
                  num_keypoints: int = 0) -> StyleInterpreter | PerceptionDecoder:
    """num_outputs: classes (or, interpreter keypoints task, keypoints); num_keypoints: perception's
    keypoint heatmaps."""
    if cfg.kind == "interpreter":
        return StyleInterpreter(
            in_channels, num_outputs, num_heads=cfg.num_heads, hidden=cfg.hidden, seed=cfg.init_seed
        )
    if cfg.kind == "perception":
        return PerceptionDecoder(
            in_channels, cfg.tasks, num_outputs, num_keypoints, dim=cfg.dim, num_heads=cfg.num_heads,
            num_queries=cfg.num_queries, num_layers=cfg.num_layers, seed=cfg.init_seed,
        )
    raise ValueError(f"decoder.kind must be 'interpreter' or 'perception', got {cfg.kind!r}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)
