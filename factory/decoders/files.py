"""A fitted decoder as a folder on local disk (callers holding a URL fetch it with
`storage.local_copy` first):

    model.safetensors   the weights; metadata holds the decoder config, the input channels, the label
                        names, the backbone hash and feature layout (names) it was fitted on
    config.yaml         the full resolved training config
    labels.json         task and label names, for people and tools
    metrics.json        written by `factory train` after the weights: the final validation metrics and
                        the labeled set's fingerprint (read by the dataset card and the HTML report)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict

import torch

from factory import tensorfile
from factory.config import DecoderConfig
from factory.decoders import FittedDecoder, build_decoder, unwrap

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
FORMAT = "factory.decoder"
LATER_SETTINGS = {"standardize": (False, ("feature_mean", "feature_std")),
                  "prior_correction": (0.0, ("logit_offset",))}
"""Decoder settings added after files were written: key -> (the value that means "off", the Style
Interpreter buffers that came with it). A file saved before a setting existed (its config lacks the
key) reads as fitted with it off, and its missing buffers load as the identity (mean 0, std 1,
offset 0), which is what it was fitted with. A file whose config has the key must have them."""


def save_decoder(
    directory: str,
    model: torch.nn.Module,
    cfg: DecoderConfig,
    label_names: Sequence[str],
    in_channels: Sequence[int],
    backbone_hash: str,
    config_yaml: str,
    keypoint_names: Sequence[str] = (),
    feature_names: Sequence[str] = (),
) -> None:
    """`feature_names`: the backbone's feature layout the decoder was fitted on (resolutions, tapped
    steps, normalisation: `BackboneIdentity.feature_names`), checked again before generating."""
    os.makedirs(directory, exist_ok=True)
    metadata = {
        "decoder": json.dumps(asdict(cfg)),
        "labels": json.dumps(list(label_names)),
        "in_channels": json.dumps(list(in_channels)),
        "backbone_hash": backbone_hash,
        "keypoint_names": json.dumps(list(keypoint_names)),
        "feature_names": json.dumps(list(feature_names)),
    }
    tensorfile.write(os.path.join(directory, MODEL_FILE), unwrap(model).state_dict(), FORMAT, metadata)
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        f.write(config_yaml)
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump({"kind": cfg.kind, "tasks": cfg.active_tasks(), "labels": list(label_names),
                   "keypoints": list(keypoint_names)}, f, indent=2)


def read_decoder_metadata(directory: str) -> dict[str, str]:
    """The safetensors metadata of the decoder saved in `directory`."""
    return tensorfile.read_metadata(os.path.join(directory, MODEL_FILE), FORMAT, "fitted decoder",
                                    "run `factory train` first")


def keypoint_names(metadata: dict[str, str]) -> list[str]:
    """The names of the keypoints a fitted decoder predicts, in its output order ([] for none), from
    its metadata: a perception decoder records them beside its classes (its `labels`); a Style
    Interpreter fitted for keypoints predicts them as its labels."""
    cfg = json.loads(metadata["decoder"])
    if cfg["kind"] == "interpreter":
        return json.loads(metadata["labels"]) if cfg.get("task") == "keypoints" else []
    return json.loads(metadata.get("keypoint_names", "[]")) if "keypoints" in cfg.get("tasks", []) else []


def load_decoder(directory: str, device: str | torch.device = "cpu") -> FittedDecoder:
    """The decoder saved in `directory`, ready for inference."""
    path = os.path.join(directory, MODEL_FILE)
    state, metadata = tensorfile.read(path, FORMAT, "fitted decoder", "run `factory train` first")
    saved_cfg = json.loads(metadata["decoder"])
    older = {key: off for key, (off, _) in LATER_SETTINGS.items() if key not in saved_cfg}
    cfg = DecoderConfig(**{**saved_cfg, **older})
    labels = json.loads(metadata["labels"])
    in_channels = json.loads(metadata["in_channels"])
    keypoints = keypoint_names(metadata)
    model = build_decoder(cfg, in_channels, len(labels), len(keypoints))
    missing, unexpected = model.load_state_dict(state, strict=False)
    for key in older:  # saved before the setting existed: its buffers load as the identity
        missing = [k for k in missing if k not in LATER_SETTINGS[key][1]]
    if missing or unexpected:
        raise ValueError(f"{path} does not match decoder {cfg.kind}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    model = model.eval().requires_grad_(False).to(device)
    return FittedDecoder(model, cfg, labels, in_channels, metadata["backbone_hash"], keypoints)
