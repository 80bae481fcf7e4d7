"""Where a backbone's weights came from, for the record a dataset carries (its card): the file and its
sha256, its format, what it was converted or trained from, and what that says about its licence.

NVIDIA's official StyleGAN2 checkpoints (and the DatasetGAN data) are under the NVIDIA Source Code
License-NC: a dataset made with them inherits a non-commercial restriction. A weights file is
known to come from one when it *is* an official pickle (told from its bytes, `checkpoint.sniff`) or
when it is a safetensors file `factory weights convert` made from one (its `converted_from`
metadata, or the JSON record beside it).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from factory import fingerprint, storage, tensorfile
from factory.backbones.checkpoint import OFFICIAL, SAFETENSORS, sniff
from factory.config import SHIPPED_DIR

if TYPE_CHECKING:
    from factory.config import BackboneConfig

def file_sha256(path: str) -> str:
    """sha256 of a local file's bytes, cached beside it (else under ~/.cache/factory) while unchanged."""
    folder, name = os.path.split(os.path.abspath(path))
    return fingerprint.cached_hash([path], folder, f".{name}.sha256{fingerprint.CACHE_FILE}", lambda: fingerprint.file_sha256(path))


def weights_provenance(cfg: BackboneConfig) -> dict:
    """What `backbone.weights` is: {"weights", "kind", "format", "sha256" (of the file, None for a
    folder or random weights), "source" (the checkpoint it was converted from, or the record of the
    run that trained it), "shipped" (one of the toy weights in factory/weights/),
    "nvidia_official" (made from an official NVIDIA pickle)}."""
    record = {"weights": cfg.weights, "kind": cfg.kind, "format": None, "sha256": None, "source": None,
              "shipped": False, "nvidia_official": False}
    if cfg.weights is None:
        record["format"] = f"seeded random weights (backbone.init_seed={cfg.init_seed})"
        return record
    if storage.is_local(cfg.weights):
        local = storage.local_path(cfg.weights)
        record["shipped"] = local.startswith(os.path.abspath(SHIPPED_DIR) + os.sep)
    if cfg.kind != "stylegan2":
        record["format"] = "diffusers pipeline folder" if os.path.isdir(cfg.weights) else "model id"
        trained = os.path.join(cfg.weights, "pretrain.json")
        if os.path.isfile(trained):
            record["source"] = _trained_from(trained)
        return record
    local = storage.fetch(cfg.weights)
    fmt = sniff(local)
    record.update(format=fmt, sha256=file_sha256(local))
    if fmt == OFFICIAL:
        record["nvidia_official"] = True
        return record
    if fmt == SAFETENSORS:
        metadata = tensorfile.read_metadata(local, None, "StyleGAN2 weights file")
        beside = os.path.splitext(local)[0] + ".json"
        if "converted_from" in metadata:
            record["source"] = {"converted_from": json.loads(metadata["converted_from"])}
        elif os.path.isfile(beside):
            with open(beside) as f:
                made = json.load(f)
            record["source"] = ({"converted_from": made["source"]} if isinstance(made.get("source"), dict)
                                else _trained_from(beside))
        converted = (record["source"] or {}).get("converted_from") or {}
        record["nvidia_official"] = converted.get("format") == OFFICIAL
    return record


def _trained_from(path: str) -> dict:
    """The parts of a `factory pretrain` record that say how the weights were made."""
    with open(path) as f:
        made = json.load(f)
    return {"trained_by": made.get("command"), "steps": made.get("steps"),
            "images": (made.get("images") or {}).get("content_hash"), "record": os.path.basename(path)}
