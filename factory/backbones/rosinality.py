"""rosinality/stylegan2-pytorch checkpoints (`g_ema`, `latent_avg`), read with
`torch.load(weights_only=True)` and renamed to this project's state-dict names."""

from __future__ import annotations

import argparse
import pickle

import torch
from torch import Tensor

from factory.backbones.checkpoint import (
    ROSINALITY,
    Checkpoint,
    check_img_channels,
    error_line,
    is_standard_fir,
    unreadable,
)
from factory.backbones.stylegan2 import (
    MappingNetwork,
    StyleGAN2Arch,
    feature_info,
)
from factory.config import ConfigError


def read_rosinality(path: str, network: str = "G_ema") -> Checkpoint:
    key = {"G_ema": "g_ema", "G": "g"}[network]
    try:
        # argparse.Namespace: the training args a rosinality checkpoint stores, rebuilt as plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = error_line(e)
        if "Unsupported global" not in reason:  # a bad opcode, a cut file: the bytes, not a refused class
            raise unreadable(path, "torch checkpoint", e) from None
        raise ValueError(f"{path}: torch.load(weights_only=True) refuses it (nothing from it is executed): {reason}") from None
    except Exception as e:  # noqa: BLE001 - whatever the parser raises on bad bytes (a cut legacy file: struct.error, IndexError)
        raise unreadable(path, "torch checkpoint", e) from None
    holds = sorted(str(k) for k in ckpt) if isinstance(ckpt, dict) else [type(ckpt).__name__]
    if not isinstance(ckpt, dict) or key not in ckpt:
        raise ValueError(f"{path} is a torch checkpoint holding {holds}, not a rosinality/stylegan2-pytorch "
                         f"checkpoint with {key!r}")
    sd = ckpt[key]
    if not isinstance(sd, dict) or "style.1.weight" not in sd:
        raise ValueError(f"{path}: {key} is not a rosinality generator state dict (no style.1.weight)")
    args = ckpt.get("args")
    lr_mlp = float(getattr(args, "lr_mlp", 0.01)) if isinstance(args, argparse.Namespace) else 0.01
    latent_avg = ckpt.get("latent_avg")
    tensors, arch = rosinality_to_factory(sd, lr_mlp, latent_avg, f"{path}: {key}")
    if latent_avg is not None:
        return Checkpoint(tensors, arch, ROSINALITY, key, holds)
    tensors["mapping.w_avg"] = _estimate_w_avg(tensors, arch)
    notes = ["latent_avg missing: w_avg is the mean w of 4096 z drawn with seed 0, as rosinality's generate.py "
             "estimates it"]
    return Checkpoint(tensors, arch, ROSINALITY, key, holds, notes, w_avg="computed")


def _layer(sd: dict, theirs: str, ours: str, out: dict, used: set) -> None:
    """One rosinality StyledConv or ToRGB under this project's (ada's) names."""
    def take(name: str) -> Tensor:
        used.add(f"{theirs}.{name}")
        return sd[f"{theirs}.{name}"]

    out[f"{ours}.weight"] = take("conv.weight")[0]
    out[f"{ours}.affine.weight"] = take("conv.modulation.weight")
    out[f"{ours}.affine.bias"] = take("conv.modulation.bias")
    if f"{theirs}.noise.weight" in sd:  # a StyledConv
        out[f"{ours}.noise_strength"] = take("noise.weight").reshape(())
        out[f"{ours}.bias"] = take("activate.bias")
    else:  # a ToRGB
        out[f"{ours}.bias"] = take("bias").flatten()


def rosinality_to_factory(sd: dict[str, Tensor], lr_mlp: float, latent_avg: Tensor | None, where: str
                          ) -> tuple[dict[str, Tensor], StyleGAN2Arch]:
    """A rosinality generator state dict renamed to this project's names, and its architecture read
    from the tensor shapes: `style.{i+1}` -> `mapping.fc{i}`, `input.input[0]` -> `b4.const`,
    `conv1`/`to_rgb1` -> `b4.conv1`/`b4.torgb`, `convs.{2k,2k+1}`/`to_rgbs.{k}` -> `b{8*2**k}.conv0,
    conv1`/`.torgb`, `noises.noise_{i}[0, 0]` -> the i-th layer's `noise_const`; in a layer
    `conv.weight[0]` -> `weight`, `conv.modulation` -> `affine`, `noise.weight[0]` -> `noise_strength`,
    `activate.bias` (ToRGB: `bias.flatten()`) -> `bias`. Its up-conv kernels already have ada's
    orientation (both flip TF's), so no weight is flipped."""
    try:
        n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
        n_up = sum(1 for k in sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
        w_dim, z_dim = sd["style.1.weight"].shape
        channels = {4: sd["conv1.conv.weight"].shape[1]}
        channels |= {8 * 2**k: sd[f"convs.{2 * k}.conv.weight"].shape[1] for k in range(n_up)}
        img_channels = sd["to_rgb1.conv.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"{where} misses {e.args[0]} (a rosinality Generator has style.*, input.input, conv1, "
                         f"to_rgb1, convs.*, to_rgbs.*)") from None
    except (AttributeError, TypeError, ValueError, IndexError) as e:  # entries that are not tensors of a layer's rank
        raise ValueError(f"{where} is not a readable rosinality generator state dict ({type(e).__name__}: {e})") from None
    resolution = 4 * 2**n_up
    channel_max = max(channels.values())
    below = [r for r, c in channels.items() if c < channel_max]
    channel_base = channels[max(below)] * max(below) if below else channel_max * resolution
    if any(min(channel_base // r, channel_max) != c for r, c in channels.items()):
        raise ValueError(f"{where}: channels per resolution {channels} follow no channel_base/channel_max rule")
    try:
        arch = StyleGAN2Arch(resolution=resolution, z_dim=int(z_dim), w_dim=int(w_dim), mapping_layers=n_mlp,
                             channel_base=channel_base, channel_max=channel_max, img_channels=int(img_channels),
                             mapping_lr_multiplier=lr_mlp)
    except ConfigError as e:
        raise ValueError(f"{where}: its architecture is not one this project runs: {e}") from None
    check_img_channels(arch, where)

    try:
        out, used = _rename_rosinality(sd, arch, latent_avg)
    except KeyError as e:
        raise ValueError(f"{where} misses {e.args[0]} (a rosinality Generator of {resolution} px has it)") from None
    for k, t in sd.items():  # the blur and upsample FIRs are fixed here: checked, then dropped
        if k.endswith(".kernel") and k not in used:
            if not is_standard_fir(t):
                raise ValueError(f"{where}: {k} is not the [1,3,3,1] filter; only rosinality's default is supported")
            used.add(k)
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{where} has tensors with no counterpart here: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return {k: v.float().contiguous() for k, v in out.items()}, arch


def _rename_rosinality(sd: dict[str, Tensor], arch: StyleGAN2Arch, latent_avg: Tensor | None
                       ) -> tuple[dict[str, Tensor], set[str]]:
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for i in range(arch.mapping_layers):
        for p in ("weight", "bias"):
            out[f"mapping.fc{i}.{p}"] = sd[f"style.{i + 1}.{p}"]
            used.add(f"style.{i + 1}.{p}")
    if latent_avg is not None:
        out["mapping.w_avg"] = latent_avg.reshape(-1)
    out["synthesis.b4.const"] = sd["input.input"][0]
    used.add("input.input")
    _layer(sd, "conv1", "synthesis.b4.conv1", out, used)
    _layer(sd, "to_rgb1", "synthesis.b4.torgb", out, used)
    for k, res in enumerate(arch.block_resolutions[1:]):
        _layer(sd, f"convs.{2 * k}", f"synthesis.b{res}.conv0", out, used)
        _layer(sd, f"convs.{2 * k + 1}", f"synthesis.b{res}.conv1", out, used)
        _layer(sd, f"to_rgbs.{k}", f"synthesis.b{res}.torgb", out, used)
    layer_names = [name for name, _, _ in feature_info(arch)]
    noises = [f"noises.noise_{i}" for i in range(len(layer_names))]
    if all(n in sd for n in noises):
        for name, n in zip(layer_names, noises):
            out[f"synthesis.{name}.noise_const"] = sd[n][0, 0]
            used.add(n)
    return out, used


@torch.no_grad()
def _estimate_w_avg(tensors: dict[str, Tensor], arch: StyleGAN2Arch) -> Tensor:
    mapping = MappingNetwork(arch)
    mapping.load_state_dict({k.removeprefix("mapping."): v for k, v in tensors.items()
                             if k.startswith("mapping.")} | {"w_avg": torch.zeros(arch.w_dim)})
    z = torch.randn(4096, arch.z_dim, generator=torch.Generator("cpu").manual_seed(0))
    return mapping(z).mean(0)
