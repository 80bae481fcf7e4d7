"""StyleGAN2 checkpoints in the layouts users have, read without running anything from the file.

    official pickle  stylegan2-ada-pytorch / stylegan3 `networks_stylegan2` snapshots
                     (`network-snapshot-*.pkl`, `ffhq.pkl`, ...): G_ema, or G on request
    rosinality .pt   rosinality/stylegan2-pytorch checkpoints (`g_ema`, `latent_avg`), read with
                     `torch.load(weights_only=True)` and renamed
    safetensors      the project's own files (`factory weights convert`, `factory pretrain`)

`read_checkpoint(path)` tells the format from the file's first bytes and returns the generator's
tensors under `StyleGAN2Generator`'s state-dict names, its architecture and what the file holds;
`load_generator`, `weights_info` (hash and architecture, cached beside the file), `convert` and
`inspect` are built on it. The readers: `official_pickle.py`, `rosinality.py`, and the project's
safetensors here. A pickle and its converted safetensors hold the same tensors under the
same names, so they have the same weights hash and a decoder fitted on one is accepted with the other.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open

from factory import fingerprint, storage, tensorfile
from factory.backbones.checkpoint import (
    NETWORKS,
    OFFICIAL,
    ROSINALITY,
    SAFETENSORS,
    Checkpoint,
    sniff,
)
from factory.backbones.official_pickle import read_official_pickle
from factory.backbones.rosinality import read_rosinality
from factory.backbones.stylegan2 import StyleGAN2Arch, StyleGAN2Generator
from factory.backbones.stylegan2_file import (
    config_from_metadata,
    generator_from_tensors,
    read_architecture,
    save_stylegan2,
)
from factory.config import StyleGAN2Config

__all__ = ["NETWORKS", "OFFICIAL", "ROSINALITY", "SAFETENSORS", "Checkpoint", "convert", "format_inspection",
           "inspect", "load_generator", "read_checkpoint", "read_official_pickle", "read_rosinality", "sniff",
           "weights_info"]


def read_checkpoint(path: str, network: str = "G_ema") -> Checkpoint:
    """The generator `network` of the checkpoint at `path` (a local file), whatever its format."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    fmt = sniff(path)
    if fmt == OFFICIAL:
        return read_official_pickle(path, network)
    if fmt == ROSINALITY:
        return read_rosinality(path, network)
    if fmt == SAFETENSORS:
        return read_project_safetensors(path)
    raise AssertionError(fmt)


def load_generator(path: str, network: str = "G_ema", device: str | torch.device = "cpu") -> StyleGAN2Generator:
    ck = read_checkpoint(path, network)
    return generator_from_tensors(ck.tensors, ck.arch, f"{path} ({ck.network})").to(device)


def read_project_safetensors(path: str) -> Checkpoint:
    tensors, metadata = tensorfile.read(path, None, "StyleGAN2 weights file")
    arch = config_from_metadata(path, metadata)
    if arch is None:
        raise ValueError(f"{path} is a safetensors file without factory.stylegan2 config metadata; write it with "
                         f"`factory weights convert` (or factory.backbones.stylegan2_file.save_stylegan2)")
    notes = []
    if "converted_from" in metadata:
        source = json.loads(metadata["converted_from"])
        notes.append(f"converted from {source.get('file')} ({source.get('format')}, "
                     f"{metadata.get('network', '?')}, sha256 {str(source.get('sha256'))[:16]})")
    return Checkpoint(tensors, arch, SAFETENSORS, "generator", ["generator"], notes)


def identity_hash(tensors_hash: str, arch: StyleGAN2Config) -> str:
    """The weights hash: the tensors' hash, plus conv_clamp when set (the one architecture setting
    the tensors do not show, and which changes the images)."""
    if arch.conv_clamp is None:
        return tensors_hash
    return fingerprint.tensors_hash({}, {"tensors": tensors_hash, "conv_clamp": repr(float(arch.conv_clamp))})


@dataclass(frozen=True)
class WeightsInfo:
    weights_hash: str
    arch: StyleGAN2Arch
    noise_const: bool
    """Whether the file stores noise_const buffers (needed by backbone.noise=const)."""


def weights_info(path: str) -> WeightsInfo:
    """Hash, architecture and noise buffers of a local weights file in any supported format, without
    building a model; cached beside the file (else under ~/.cache/factory) while it is unchanged."""
    folder, name = os.path.split(os.path.abspath(path))
    if sniff(path) == SAFETENSORS:
        arch = read_architecture(path)
        tensors_hash = fingerprint.cached_hash(
            [path], folder, f".{name}{fingerprint.CACHE_FILE}",
            lambda: fingerprint.safetensors_fingerprint(path, with_metadata=False))
        with safe_open(path, "pt") as f:
            noise_const = any(k.endswith(".noise_const") for k in f.keys())
        return WeightsInfo(identity_hash(tensors_hash, arch), arch, noise_const)

    def describe() -> str:  # the record cached for formats that must be read whole
        ck = read_checkpoint(path)
        return json.dumps({"tensors_hash": fingerprint.tensors_hash(ck.tensors), "architecture": asdict(ck.arch),
                           "noise_const": any(k.endswith(".noise_const") for k in ck.tensors)})

    record = json.loads(fingerprint.cached_hash([path], folder, f".{name}.factory-checkpoint.json", describe))
    arch = StyleGAN2Arch(**record["architecture"])  # a record cached before the mapping widths: w_dim
    return WeightsInfo(identity_hash(record["tensors_hash"], arch), arch, record["noise_const"])


def record_path(out: str) -> str:
    """The JSON record beside a converted file: the same stem, `.json`."""
    return os.path.splitext(out)[0] + ".json"


def convert(source: str, out: str, network: str = "G_ema", command: str | None = None) -> dict:
    """Write the generator `network` of the checkpoint at `source` (a local path or storage URL) as
    this project's safetensors at `out` (same), with its JSON record beside it (`record_path`): source
    file name, format and sha256, the network taken, the architecture, the weights hash, the package
    version. Both are published through temporary names; returns the record."""
    from factory import __version__

    if not out.endswith(".safetensors"):
        raise ValueError(f"the converted file must be a .safetensors file, got {out}")
    local_source = storage.fetch(source)
    if storage.is_local(out) and os.path.abspath(storage.local_path(out)) == os.path.abspath(local_source):
        raise ValueError(f"{out}: converting a file onto itself")
    ck = read_checkpoint(local_source, network)
    model = generator_from_tensors(ck.tensors, ck.arch, f"{source} ({ck.network})")
    record = {
        "source": {"file": os.path.basename(source.rstrip("/")), "url": source, "format": ck.format,
                   "sha256": fingerprint.file_sha256(local_source), "holds": ck.holds},
        "network": ck.network,
        "architecture": asdict(ck.arch),
        "weights_hash": identity_hash(fingerprint.tensors_hash(ck.tensors), ck.arch),
        "noise_const": model.has_noise_const,
        "w_avg": ck.w_avg,
        "notes": ck.notes,
        "factory_version": __version__,
        "command": command,
    }
    with tempfile.TemporaryDirectory(prefix="factory-convert-") as d:
        tmp = os.path.join(d, "weights.safetensors")
        save_stylegan2(model, tmp, {"converted_from": json.dumps(record["source"], sort_keys=True),
                                    "network": ck.network})
        storage.write_json(record_path(out), record)
        storage.put_file(tmp, out)
    return record


def inspect(path: str, network: str = "G_ema") -> dict:
    """What a weights file (a local path or storage URL) holds, for people: format, the generator
    taken, its architecture and tensors."""
    ck = read_checkpoint(storage.fetch(path), network)
    arch = ck.arch
    params = sum(t.numel() for k, t in ck.tensors.items() if not k.endswith((".noise_const", "w_avg")))
    return {
        "file": path,
        "format": ck.format,
        "holds": ck.holds,
        "network": ck.network,
        "resolution": arch.resolution,
        "z_dim": arch.z_dim,
        "w_dim": arch.w_dim,
        "mapping_layers": arch.mapping_layers,
        "layer_features": arch.layer_features,
        "embed_features": arch.embed_features,
        "img_channels": arch.img_channels,
        "channels": {str(r): arch.channels(r) for r in arch.block_resolutions},
        "conditioning": f"class-conditional, c_dim={arch.c_dim}" if arch.c_dim else "none",
        "w_avg": ck.w_avg,
        "w_avg_norm": round(float(ck.tensors["mapping.w_avg"].norm()), 4),
        "conv_clamp": arch.conv_clamp,
        "num_fp16_res": arch.num_fp16_res,
        "fp16_resolutions": arch.fp16_resolutions,
        "noise_const": any(k.endswith(".noise_const") for k in ck.tensors),
        "tensors": len(ck.tensors),
        "parameters": params,
        "weights_hash": identity_hash(fingerprint.tensors_hash(ck.tensors), arch),
        "architecture": asdict(arch),
        "notes": ck.notes,
    }


def _mapping_widths(info: dict) -> str:
    """The mapping layers' widths, e.g. "z 512 + class embedding 512 -> 512 -> ... -> w 512"."""
    conditional = info["conditioning"] != "none"
    first = f"z {info['z_dim']}" + (f" + class embedding {info['embed_features']}" if conditional else "")
    return " -> ".join([first] + [str(info["layer_features"])] * (info["mapping_layers"] - 1) + [f"w {info['w_dim']}"])


def format_inspection(info: dict) -> str:
    lines = [
        f"file          {info['file']}",
        f"format        {info['format']}" + ("" if info["format"] == SAFETENSORS else
                                             f" (holds {', '.join(info['holds'])}; generator taken: {info['network']})"),
        f"resolution    {info['resolution']} px, z_dim {info['z_dim']}, w_dim {info['w_dim']}, "
        f"{info['mapping_layers']} mapping layers",
        f"mapping       {_mapping_widths(info)}",
        f"image         {info['img_channels']} channel" + {1: " (grayscale: the backbone repeats it to RGB)",
                                                          3: "s (RGB)"}.get(info["img_channels"], "s"),
        f"channels      {', '.join(f'{r}:{c}' for r, c in info['channels'].items())}",
        f"conditioning  {info['conditioning']}",
        f"w_avg         {info['w_avg']} (norm {info['w_avg_norm']})",
        f"conv_clamp    {info['conv_clamp']}",
        f"fp16 blocks   {info['num_fp16_res']} {info['fp16_resolutions']} (float32 on a CPU)",
        f"noise_const   {'stored (backbone.noise=const available)' if info['noise_const'] else 'none'}",
        f"tensors       {info['tensors']} ({info['parameters']:,} parameters)",
        f"weights hash  {info['weights_hash'][:16]}",
    ]
    lines += [f"note          {n}" for n in info["notes"]]
    return "\n".join(lines)
