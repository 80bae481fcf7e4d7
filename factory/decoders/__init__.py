"""Decoders: backbone features -> labels, plus an uncertainty score per pixel and per sample.

A fitted decoder is a folder: `model.safetensors` (weights; metadata holds the decoder config, the
input channels, the label names and the backbone hash it was fitted on), `config.yaml` (the full
resolved training config) and `labels.json` (task and label names, for people and tools).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from factory import storage
from factory.config import DecoderConfig
from factory.decoders.interpreter import StyleInterpreter, predict_keypoints, predict_segmentation
from factory.decoders.perception import PerceptionDecoder, predict

MODEL_FILE = "model.safetensors"


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
    in_channels: list[int]
    backbone_hash: str
    keypoint_names: list[str]

    @torch.inference_mode()
    def __call__(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> Decoded:
        if self.cfg.kind == "perception":
            p = predict(self.model, features, size, self.cfg.uncertainty_top_fraction, self.cfg.instance_threshold)
            b = features[0].shape[0]
            uncertainty = p.pixel_uncertainty if p.pixel_uncertainty is not None else torch.zeros(b, *size)
            return Decoded(
                masks=p.masks.to(torch.uint8).cpu() if p.masks is not None else None,
                keypoints=p.keypoints.float().cpu() if p.keypoints is not None else None,
                pixel_uncertainty=uncertainty.float().cpu(), score=p.score.float().cpu(),
                depth=p.depth.float().cpu() if p.depth is not None else None,
                instance_map=p.instance_map.cpu() if p.instance_map is not None else None,
                instances=p.instances,
            )
        if self.cfg.task == "segmentation":
            p = predict_segmentation(self.model, features, size, self.cfg.uncertainty_top_fraction)
            masks = p.labels.to(torch.uint8).cpu()
            return Decoded(masks, None, p.pixel_uncertainty.float().cpu(), p.score.float().cpu())
        p = predict_keypoints(self.model, features, size, self.cfg.uncertainty_top_fraction)
        return Decoded(None, p.keypoints.float().cpu(), p.pixel_uncertainty.float().cpu(), p.score.float().cpu())


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


def save_decoder(
    directory: str,
    model: torch.nn.Module,
    cfg: DecoderConfig,
    label_names: Sequence[str],
    in_channels: Sequence[int],
    backbone_hash: str,
    config_yaml: str,
    keypoint_names: Sequence[str] = (),
) -> None:
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    metadata = {
        "format": "factory.decoder",
        "decoder": json.dumps(asdict(cfg)),
        "labels": json.dumps(list(label_names)),
        "in_channels": json.dumps(list(in_channels)),
        "backbone_hash": backbone_hash,
        "keypoint_names": json.dumps(list(keypoint_names)),
    }
    save_file(state, os.path.join(directory, MODEL_FILE), metadata=metadata)
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        f.write(config_yaml)
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump({"kind": cfg.kind, "tasks": cfg.active_tasks(), "labels": list(label_names),
                   "keypoints": list(keypoint_names)}, f, indent=2)


def read_decoder_metadata(directory: str) -> dict[str, str]:
    """The safetensors metadata of the decoder saved in `directory` (a local folder or any URL)."""
    with storage.local_copy(directory, [MODEL_FILE]) as local:
        return _read_metadata(local)


def _read_metadata(directory: str) -> dict[str, str]:
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fitted decoder at {directory} (missing {MODEL_FILE}); run `factory train` first")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if metadata.get("format") != "factory.decoder":
        raise ValueError(f"{path} is not a factory decoder (metadata format={metadata.get('format')!r})")
    return metadata


def load_decoder(directory: str, device: str | torch.device = "cpu") -> FittedDecoder:
    """The decoder saved in `directory` (a local folder or any URL), ready for inference."""
    with storage.local_copy(directory, [MODEL_FILE]) as local:
        return _load(local, device)


def _load(directory: str, device: str | torch.device) -> FittedDecoder:
    metadata = _read_metadata(directory)
    cfg = DecoderConfig(**json.loads(metadata["decoder"]))
    labels = json.loads(metadata["labels"])
    in_channels = json.loads(metadata["in_channels"])
    keypoint_names = json.loads(metadata.get("keypoint_names", "[]"))
    model = build_decoder(cfg, in_channels, len(labels), len(keypoint_names))
    state = load_file(os.path.join(directory, MODEL_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{os.path.join(directory, MODEL_FILE)} does not match decoder {cfg.kind}: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model = model.eval().requires_grad_(False).to(device)
    return FittedDecoder(model, cfg, labels, in_channels, metadata["backbone_hash"], keypoint_names)
