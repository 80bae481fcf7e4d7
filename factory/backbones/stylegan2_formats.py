"""StyleGAN2 checkpoints in the layouts users have, read without running anything from the file.

    official pickle  stylegan2-ada-pytorch / stylegan3 `networks_stylegan2` snapshots
                     (`network-snapshot-*.pkl`, `ffhq.pkl`, ...): G_ema, or G on request
    rosinality .pt   rosinality/stylegan2-pytorch checkpoints (`g_ema`, `latent_avg`), read with
                     `torch.load(weights_only=True)` and renamed
    safetensors      the project's own files (`factory weights convert`, `factory pretrain`)

`read_checkpoint(path)` tells the format from the file's first bytes and returns the generator's
tensors under `StyleGAN2Generator`'s state-dict names, its architecture and what the file holds;
`load_generator`, `weights_info` (hash and architecture, cached beside the file), `convert` and
`inspect` are built on it. A pickle and its converted safetensors hold the same tensors under the
same names, so they have the same weights hash and a decoder fitted on one is accepted with the other.

Official pickles. Every network class is a `torch_utils.persistence` "persistent class": it pickles as
`_reconstruct_persistent_obj(meta)` with `meta = {type, version, module_src, class_name, state}`, and
`pickle.load` would `exec` `module_src` (the whole defining module) to rebuild it. `_OfficialUnpickler`
resolves only an explicit allow-list of names: tensor, parameter and storage rebuilders (storages are
nested legacy `torch.save` bytes, read with `torch.load(weights_only=True)`), `collections.OrderedDict`,
sets, numpy's scalar and array reconstructors, `dnnlib.util.EasyDict` as a plain dict, and the
persistence reconstructor as `PersistentRecord`, an inert record of class name, state and source
(never executed). Any other global is refused with its name. It never imports torch_utils, dnnlib
or training. The architecture comes from G's stored `init_kwargs` and, where the two official repos'
defaults differ (stylegan3 defaults conv_clamp=256 and num_fp16_res=4), from each layer's stored
attributes, which are the values the network ran with.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from numpy._core import multiarray as _np_multiarray
from safetensors import safe_open
from torch import Tensor

from factory import fingerprint, storage, tensorfile
from factory.backbones.stylegan2 import (
    MappingNetwork,
    StyleGAN2Generator,
    config_from_metadata,
    feature_info,
    generator_from_tensors,
    read_architecture,
    save_stylegan2,
)
from factory.config import ConfigError, StyleGAN2Config

SAFETENSORS, OFFICIAL, ROSINALITY = "safetensors", "official pickle", "rosinality .pt"
NETWORKS = ("G_ema", "G")
"""Which generator of a training snapshot to take: the EMA weights (what every official tool samples
from) or the raw trained ones."""

_LEGACY_TORCH = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
"""First bytes of a legacy (pre-zip) `torch.save` file: its magic number, pickled."""
_ZIP = b"PK\x03\x04"


class PersistentRecord:
    """What an official persistent object is, recorded instead of re-created: the class name, the
    instance state (parameters, buffers, submodules, attributes) and the module source, kept as text."""

    def __init__(self, class_name: str, state: dict, module_src: str) -> None:
        self.class_name, self.state, self.module_src = class_name, state, module_src

    @property
    def children(self) -> dict:
        return dict(self.state.get("_modules") or {})

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})


def _reconstruct_persistent(meta: object) -> PersistentRecord:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: records, never executes."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("a persistent object without the official {type: 'class', state} record")
    return PersistentRecord(str(meta.get("class_name")), meta["state"], str(meta.get("module_src", "")))


class _PlainDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: the same items, no code from dnnlib."""


def _storage(data: bytes) -> torch.storage.TypedStorage:
    """A storage pickled by torch (`torch.storage._load_from_bytes`): legacy `torch.save` bytes."""
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor storage that is a {type(storage).__name__}")
    return storage


def _tensor(storage: object, offset: int, size: tuple, stride: tuple, *_ignored: object) -> Tensor:
    """`torch._utils._rebuild_tensor_v2` without its backward hooks and metadata (never used here)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor whose storage is a {type(storage).__name__}")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _parameter(data: object, *_ignored: object) -> Tensor:
    """A pickled `nn.Parameter` as its plain tensor: only the values are read."""
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError(f"a parameter holding a {type(data).__name__}")
    return data


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent,
    ("dnnlib.util", "EasyDict"): _PlainDict,
    ("dnnlib", "EasyDict"): _PlainDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
}
"""Every global an official snapshot (G, D, G_ema, augment_pipe, training_set_kwargs) refers to,
pickled by torch 1.7-2.x and numpy 1 or 2, mapped to something that only builds data."""


class RefusedGlobal(pickle.UnpicklingError):
    """The file refers to a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        super().__init__(f"{module}.{name}")


class _OfficialUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's protocol
        found = _ALLOWED.get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found

    def persistent_load(self, pid: object):  # noqa: ANN201
        raise pickle.UnpicklingError(f"a persistent id {str(pid)[:40]!r}, which official pickles do not use")


@dataclass
class Checkpoint:
    """A generator read from a checkpoint file, in this project's terms."""

    tensors: dict[str, Tensor]
    """Under `StyleGAN2Generator.state_dict()` names (resample filters dropped, noise_const kept)."""
    arch: StyleGAN2Config
    format: str
    network: str
    """Which generator of the file: "G_ema" or "G" (rosinality: "g_ema" / "g"); "generator" for safetensors."""
    holds: list[str]
    """The file's top-level entries (e.g. ['D', 'G', 'G_ema', 'augment_pipe', 'training_set_kwargs'])."""
    notes: list[str] = field(default_factory=list)
    """What was not read from the file but decided here (e.g. a computed w_avg), or where it came from."""
    w_avg: str = "stored"
    """"stored" (the checkpoint's own), or "computed" when the file has none (see notes)."""


def sniff(path: str) -> str:
    """The format of the file at `path`, from its first bytes (never from its name)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"StyleGAN2 weights file {path} not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP) or head.startswith(_LEGACY_TORCH):
        return ROSINALITY
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS  # an 8-byte header length, then the JSON header
    if head[:1] == b"\x80":
        return OFFICIAL
    what = "an empty file" if not head else f"a file starting with {head[:8]!r}"
    raise ValueError(f"{path} is {what}, not a StyleGAN2 checkpoint (official pickle, rosinality .pt, or "
                     f"this project's safetensors)")


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


# ---- this project's safetensors ------------------------------------------------------------------


def read_project_safetensors(path: str) -> Checkpoint:
    tensors, metadata = tensorfile.read(path, None, "StyleGAN2 weights file")
    arch = config_from_metadata(path, metadata)
    if arch is None:
        raise ValueError(f"{path} is a safetensors file without factory.stylegan2 config metadata; write it with "
                         f"`factory weights convert` (or factory.backbones.stylegan2.save_stylegan2)")
    notes = []
    if "converted_from" in metadata:
        source = json.loads(metadata["converted_from"])
        notes.append(f"converted from {source.get('file')} ({source.get('format')}, "
                     f"{metadata.get('network', '?')}, sha256 {str(source.get('sha256'))[:16]})")
    return Checkpoint(tensors, arch, SAFETENSORS, "generator", ["generator"], notes)


# ---- official pickles ----------------------------------------------------------------------------


def read_official_pickle(path: str, network: str = "G_ema") -> Checkpoint:
    try:
        with open(path, "rb") as f:
            data = _OfficialUnpickler(f).load()
    except RefusedGlobal as e:
        if e.module.startswith("dnnlib.tflib"):
            raise ValueError(
                f"{path} is a TensorFlow StyleGAN pickle ({e.module}.{e.name}); convert it once with "
                f"stylegan2-ada-pytorch (`python legacy.py --source={os.path.basename(path)} --dest=OUT.pkl`, "
                f"which runs NVIDIA's code on it), then use OUT.pkl") from None
        raise ValueError(f"{path}: refusing to load the global {e.module}.{e.name}: only tensors, dicts and official "
                         f"StyleGAN2 network records are read from a pickle, nothing in it is executed") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable pickle (truncated or corrupt): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None

    if isinstance(data, PersistentRecord):  # a pickled generator on its own
        holds, record, taken = [data.class_name], data, data.class_name
    elif isinstance(data, dict):
        holds = sorted(str(k) for k in data)
        if network not in data:
            hint = (" (G_ema missing: the raw generator G is there; take it with "
                    "`factory weights convert IN OUT --network G`)") if network == "G_ema" and "G" in data else ""
            raise ValueError(f"{path} holds {holds} but no {network}{hint}")
        record, taken = data[network], network
    else:
        raise ValueError(f"{path} holds a pickled {type(data).__name__}, not an official StyleGAN2 snapshot")
    if not isinstance(record, PersistentRecord):
        raise ValueError(f"{path}: {taken} is a {type(record).__name__}, not an official StyleGAN2 network record")
    try:
        arch = _official_architecture(path, taken, record)
        tensors = _official_tensors(path, taken, record)
    except (TypeError, AttributeError, KeyError) as e:  # a record whose state is not a module's
        raise ValueError(f"{path}: {taken} is not a readable StyleGAN2 network record ({type(e).__name__}: {e})") from None
    return Checkpoint(tensors, arch, OFFICIAL, taken, holds)


def _modules(record: PersistentRecord, prefix: str = "") -> dict[str, PersistentRecord]:
    """Every submodule record under `record`, by dotted path ('' is the record itself)."""
    out = {prefix.rstrip("."): record}
    for name, child in record.children.items():
        if isinstance(child, PersistentRecord):
            out.update(_modules(child, f"{prefix}{name}."))
    return out


_GENERATOR_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs")


def _official_architecture(path: str, taken: str, g: PersistentRecord) -> StyleGAN2Config:
    where = f"{path}: {taken}"
    mods = _modules(g)
    synthesis, mapping = mods.get("synthesis"), mods.get("mapping")
    if synthesis is not None and ("input" in synthesis.children
                                  or any(n[:1] == "L" and n[1:2].isdigit() for n in synthesis.children)):
        layers = [n for n in synthesis.children][:3]
        raise ValueError(f"{where} is a StyleGAN3 alias-free generator (networks_stylegan3: synthesis.{layers}); "
                         f"only StyleGAN2 generators (stylegan2-ada-pytorch, stylegan3's networks_stylegan2) are supported")
    if g.class_name != "Generator" or synthesis is None or mapping is None or "b4" not in synthesis.children:
        raise ValueError(f"{where} is a {g.class_name} with submodules {sorted(g.children)}, not a StyleGAN2 "
                         f"Generator (mapping, synthesis.b4 ...)")
    init_args = tuple(g.state.get("_init_args") or ())
    kwargs = {**dict(zip(_GENERATOR_ARGS, init_args)), **g.init_kwargs}
    missing = [k for k in _GENERATOR_ARGS[:5] if k not in kwargs]
    if missing:
        raise ValueError(f"{where} stores no {missing} in its init_kwargs ({sorted(kwargs)})")
    synthesis_kwargs = {**dict(kwargs.get("synthesis_kwargs") or {}),
                        **{k: v for k, v in kwargs.items() if k not in (*_GENERATOR_ARGS, "synthesis_kwargs")}}

    blocks = {n: mods[f"synthesis.{n}"] for n in synthesis.children if f"synthesis.{n}" in mods}
    for name, block in blocks.items():
        arch = block.state.get("architecture", "skip")
        if arch != "skip":
            raise ValueError(f"{where} uses architecture={arch!r} (synthesis.{name}); only 'skip', the official "
                             f"generator default, is supported")
    layers = {p: m for p, m in mods.items() if p.startswith("synthesis.b") and p.count(".") == 2}
    for p, layer in layers.items():
        if layer.class_name == "SynthesisLayer":
            if layer.state.get("use_noise", True) is not True:
                raise ValueError(f"{where} has use_noise=False ({p}); only generators with noise inputs are supported")
            if layer.state.get("activation", "lrelu") != "lrelu":
                raise ValueError(f"{where} uses activation={layer.state.get('activation')!r} ({p}); only 'lrelu' "
                                 f"is supported")
    clamps = {layer.state.get("conv_clamp") for layer in layers.values()}
    if len(clamps) != 1:
        raise ValueError(f"{where} clamps its layers differently ({sorted(map(str, clamps))}); one conv_clamp is supported")
    conv_clamp = clamps.pop()
    fc = [mods.get(f"mapping.fc{i}") for i in range(int(mapping.state.get("num_layers", 0)))]
    if any(layer.state.get("activation", "lrelu") != "lrelu" for layer in fc if layer is not None):
        raise ValueError(f"{where}: its mapping layers use an activation other than 'lrelu'")
    if mapping.state.get("w_avg_beta", 0.995) is None:
        raise ValueError(f"{where} tracks no w_avg (w_avg_beta=None); truncation needs the checkpoint's own w_avg")
    mapping_kwargs = dict(kwargs.get("mapping_kwargs") or {})
    lr_multiplier = fc[0].state.get("bias_gain") if fc and fc[0] is not None else None
    try:
        return StyleGAN2Config(
            resolution=int(kwargs["img_resolution"]), z_dim=int(kwargs["z_dim"]), w_dim=int(kwargs["w_dim"]),
            mapping_layers=int(mapping.state.get("num_layers", mapping_kwargs.get("num_layers", 8))),
            channel_base=int(synthesis_kwargs.get("channel_base", 32768)),
            channel_max=int(synthesis_kwargs.get("channel_max", 512)),
            img_channels=int(kwargs["img_channels"]),
            mapping_lr_multiplier=float(lr_multiplier if lr_multiplier is not None
                                        else mapping_kwargs.get("lr_multiplier", 0.01)),
            w_avg_beta=float(mapping.state.get("w_avg_beta", 0.995)),
            c_dim=int(kwargs["c_dim"]),
            conv_clamp=None if conv_clamp is None else float(conv_clamp),
            num_fp16_res=sum(bool(b.state.get("use_fp16", False)) for b in blocks.values()),
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: its architecture is not one this project runs: {e}") from None


_FIR = torch.outer(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0]))


def _is_standard_fir(t: Tensor) -> bool:
    """Whether a stored resampling filter is [1,3,3,1] (separable, any normalisation)."""
    return tuple(t.shape) == (4, 4) and bool(torch.allclose(t.float() / t.float().sum(), _FIR / _FIR.sum(), atol=1e-6))


def _official_tensors(path: str, taken: str, g: PersistentRecord) -> dict[str, Tensor]:
    """Every parameter and persistent buffer of `g` by its state-dict name, resample filters dropped
    (checked to be the [1,3,3,1] filter this network hard-codes)."""
    tensors: dict[str, Tensor] = {}
    for prefix, module in _modules(g).items():
        state = module.state
        skip = set(state.get("_non_persistent_buffers_set") or ())
        items = list((state.get("_parameters") or {}).items())
        items += [(n, t) for n, t in (state.get("_buffers") or {}).items() if n not in skip]
        for name, t in items:
            key = f"{prefix}.{name}" if prefix else name
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise ValueError(f"{path}: {taken}.{key} is a {type(t).__name__}, not a tensor")
            if name == "resample_filter":
                if not _is_standard_fir(t):
                    raise ValueError(f"{path}: {taken}.{key} is not the [1,3,3,1] filter (resample_filter="
                                     f"{t.tolist()}); only the official default is supported")
                continue
            tensors[key] = t.float().contiguous() if t.dtype != torch.float32 else t.contiguous()
        for name, child in module.children.items():
            if child is not None and not isinstance(child, PersistentRecord):
                raise ValueError(f"{path}: {taken}.{prefix + '.' if prefix else ''}{name} is a "
                                 f"{type(child).__name__}, not an official StyleGAN2 layer")
    return tensors


# ---- rosinality/stylegan2-pytorch ----------------------------------------------------------------


def read_rosinality(path: str, network: str = "G_ema") -> Checkpoint:
    key = {"G_ema": "g_ema", "G": "g"}[network]
    try:
        # argparse.Namespace: the training args a rosinality checkpoint stores, rebuilt as plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: torch.load(weights_only=True) refuses it (nothing from it is executed): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
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
                          ) -> tuple[dict[str, Tensor], StyleGAN2Config]:
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
    resolution = 4 * 2**n_up
    channel_max = max(channels.values())
    below = [r for r, c in channels.items() if c < channel_max]
    channel_base = channels[max(below)] * max(below) if below else channel_max * resolution
    if any(min(channel_base // r, channel_max) != c for r, c in channels.items()):
        raise ValueError(f"{where}: channels per resolution {channels} follow no channel_base/channel_max rule")
    try:
        arch = StyleGAN2Config(resolution=resolution, z_dim=int(z_dim), w_dim=int(w_dim), mapping_layers=n_mlp,
                               channel_base=channel_base, channel_max=channel_max, img_channels=int(img_channels),
                               mapping_lr_multiplier=lr_mlp)
    except ConfigError as e:
        raise ValueError(f"{where}: its architecture is not one this project runs: {e}") from None

    try:
        out, used = _rename_rosinality(sd, arch, latent_avg)
    except KeyError as e:
        raise ValueError(f"{where} misses {e.args[0]} (a rosinality Generator of {resolution} px has it)") from None
    for k, t in sd.items():  # the blur and upsample FIRs are fixed here: checked, then dropped
        if k.endswith(".kernel") and k not in used:
            if not _is_standard_fir(t):
                raise ValueError(f"{where}: {k} is not the [1,3,3,1] filter; only rosinality's default is supported")
            used.add(k)
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{where} has tensors with no counterpart here: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return {k: v.float().contiguous() for k, v in out.items()}, arch


def _rename_rosinality(sd: dict[str, Tensor], arch: StyleGAN2Config, latent_avg: Tensor | None
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
def _estimate_w_avg(tensors: dict[str, Tensor], arch: StyleGAN2Config) -> Tensor:
    mapping = MappingNetwork(arch)
    mapping.load_state_dict({k.removeprefix("mapping."): v for k, v in tensors.items()
                             if k.startswith("mapping.")} | {"w_avg": torch.zeros(arch.w_dim)})
    z = torch.randn(4096, arch.z_dim, generator=torch.Generator("cpu").manual_seed(0))
    return mapping(z).mean(0)


# ---- identity, conversion, inspection ------------------------------------------------------------


def identity_hash(tensors_hash: str, arch: StyleGAN2Config) -> str:
    """The weights hash: the tensors' hash, plus conv_clamp when set (the one architecture setting
    the tensors do not show, and which changes the images)."""
    if arch.conv_clamp is None:
        return tensors_hash
    return fingerprint.tensors_hash({}, {"tensors": tensors_hash, "conv_clamp": repr(float(arch.conv_clamp))})


@dataclass(frozen=True)
class WeightsInfo:
    weights_hash: str
    arch: StyleGAN2Config
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
    arch = StyleGAN2Config(**record["architecture"])
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


def format_inspection(info: dict) -> str:
    lines = [
        f"file          {info['file']}",
        f"format        {info['format']}" + ("" if info["format"] == SAFETENSORS else
                                             f" (holds {', '.join(info['holds'])}; generator taken: {info['network']})"),
        f"resolution    {info['resolution']} px, z_dim {info['z_dim']}, w_dim {info['w_dim']}, "
        f"{info['mapping_layers']} mapping layers",
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

