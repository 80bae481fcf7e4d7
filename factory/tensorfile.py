"""The project's own safetensors files: one writer, one reader, one wording of their errors.

Every artifact the factory stores as safetensors (generators, decoders, labeled sets, segmenters)
carries a `format` tag in its metadata, so a file handed to the wrong loader is named and refused
instead of half-loaded. safetensors holds tensors and strings only: loading one never runs code.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def write(path: str, tensors: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str]) -> None:
    """Tensors (moved to the CPU, made contiguous) with `{"format": fmt, **metadata}`."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": fmt, **metadata})


def read_metadata(path: str, fmt: str | None, what: str, hint: str = "") -> dict[str, str]:
    """The metadata of the `fmt` file at `path` (any format when `fmt` is None). Errors name the file:
    FileNotFoundError when it is missing, ValueError when it is not safetensors or not a `what`;
    `hint` says how to make the right file."""
    suffix = f"; {hint}" if hint else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found{suffix}")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if fmt is not None and metadata.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} (metadata format={metadata.get('format')!r}){suffix}")
    return metadata


def read(path: str, fmt: str | None, what: str, hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the `fmt` file at `path`, checked as `read_metadata` does."""
    metadata = read_metadata(path, fmt, what, hint)
    try:
        with safe_open(path, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    return tensors, metadata
