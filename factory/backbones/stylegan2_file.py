"""The project's StyleGAN2 weights file: a safetensors file of the generator's state dict with its
architecture in the metadata (format tag `factory.stylegan2`; `config` is the `StyleGAN2Arch` as
JSON, the mapping widths included; a file written before they were stored reads them as w_dim).
Strict on load: every key and shape must match, all problems in one error naming the file."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import Tensor

from factory import tensorfile
from factory.backbones.checkpoint import check_img_channels
from factory.backbones.stylegan2 import (
    StyleGAN2Arch,
    StyleGAN2Generator,
    as_arch,
    feature_info,
)
from factory.config import StyleGAN2Config

FORMAT = "factory.stylegan2"


def read_architecture(path: str) -> StyleGAN2Arch:
    """The architecture stored in a weights file written by `save_stylegan2`, without its tensors."""
    stored = config_from_metadata(Path(path), tensorfile.read_metadata(str(path), None, "StyleGAN2 weights file"))
    if stored is None:
        raise ValueError(f"{path} has no factory.stylegan2 config metadata")
    return stored


def save_stylegan2(model: StyleGAN2Generator, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """The generator's state dict (with its `noise_const` buffers when it has them) and its
    architecture, plus any `metadata` (e.g. where a converted checkpoint came from)."""
    tensorfile.write(str(path), model.state_dict(), FORMAT, {**(metadata or {}), "config": json.dumps(asdict(model.cfg))})


def config_from_metadata(path: Path, metadata: dict[str, str]) -> StyleGAN2Arch | None:
    if "config" not in metadata:
        return None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        arch = StyleGAN2Arch(**json.loads(metadata["config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: stored stylegan2 config is unreadable: {e}") from e
    check_img_channels(arch, str(path))
    return arch


def generator_from_tensors(tensors: dict[str, Tensor], cfg: StyleGAN2Config, where: str) -> StyleGAN2Generator:
    """A generator holding exactly `tensors`: every key and shape must match `cfg` (all problems in
    one line naming `where`). The `noise_const` buffers are optional, all or none."""
    model = StyleGAN2Generator(cfg, seed=0, w_avg_samples=0)
    if any(f"synthesis.{name}.noise_const" in tensors for name, _, _ in feature_info(cfg)):
        for layer, (_, _, res) in zip(model.synthesis.layers(), feature_info(cfg)):
            layer.noise_const = torch.zeros(res, res)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [(k, tuple(expected[k].shape), tuple(t.shape)) for k, t in tensors.items()
                  if k in expected and t.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        problems += [f"shape mismatch: {k} expected {e} found {s}" for k, e, s in mismatched]
        raise ValueError(f"{where} does not match the StyleGAN2 architecture: {'; '.join(problems)}")
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def load_stylegan2(path: str | Path, cfg: StyleGAN2Config | None = None,
                   device: str | torch.device = "cpu") -> StyleGAN2Generator:
    """A project safetensors file, strictly: every key and shape must match, all problems in one error."""
    path = Path(path)
    tensors, metadata = tensorfile.read(str(path), None, "StyleGAN2 weights file")
    stored = config_from_metadata(path, metadata)
    if stored is None and cfg is None:
        raise ValueError(f"{path} has no factory.stylegan2 config metadata; pass cfg explicitly")
    if stored is not None and cfg is not None:
        for fld in fields(StyleGAN2Arch):
            given, found = getattr(as_arch(cfg), fld.name), getattr(stored, fld.name)
            if given != found:
                raise ValueError(f"{path}: config mismatch on stylegan2.{fld.name}: "
                                 f"given {given!r}, file has {found!r}")
    return generator_from_tensors(tensors, stored or cfg, str(path)).to(device)
