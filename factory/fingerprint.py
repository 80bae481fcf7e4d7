"""Content hashes: identify weights and labeled sets by what they hold, not by their file bytes.

safetensors writes its metadata map in no fixed order, so two saves of the same tensors can differ
byte for byte; resume and dataset identity must not depend on that.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import safe_open


def tensors_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    h.update(json.dumps(metadata or {}, sort_keys=True).encode())
    return h.hexdigest()


def state_hash(module: torch.nn.Module) -> str:
    """Identifies a module's weights whatever file they came from."""
    return tensors_hash(module.state_dict())


def safetensors_fingerprint(path: str) -> str:
    """Hash of a safetensors file's tensors and metadata, independent of serialization order."""
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata() or {}
    return tensors_hash(tensors, metadata)
