"""Official StyleGAN2 pickles (stylegan2-ada-pytorch, stylegan3's `networks_stylegan2`), read
without running anything from the file.

Every network class is a `torch_utils.persistence` "persistent class": it pickles as
`_reconstruct_persistent_obj(meta)` with `meta = {type, version, module_src, class_name, state}`, and
`pickle.load` would `exec` `module_src` (the whole defining module) to rebuild it. `_OfficialUnpickler`
resolves only an explicit allow-list of names: tensor, parameter and storage rebuilders (storages are
nested legacy `torch.save` bytes, read with `torch.load(weights_only=True)`), `collections.OrderedDict`,
sets, numpy's scalar and array reconstructors, `dnnlib.util.EasyDict` as a plain dict, and the
persistence reconstructor as `PersistentRecord`, an inert record of class name, state and source
(never executed). Any other global is refused with its name. It never imports torch_utils, dnnlib
or training. The architecture comes from G's stored `init_kwargs` and, where the two official repos'
defaults differ (stylegan3 defaults conv_clamp=256 and num_fp16_res=4), from each layer's stored
attributes, which are the values the network ran with; the mapping widths (`mapping_kwargs`
embed_features, layer_features) from the kwargs, else from the layers' shapes. A file whose bytes do
not parse, whatever the parser raises, is refused in one line as truncated or corrupt.
"""

from __future__ import annotations

import collections
import io
import os
import pickle

import numpy as np
import torch
from numpy._core import multiarray as _np_multiarray
from torch import Tensor

from factory.backbones.checkpoint import (
    OFFICIAL,
    Checkpoint,
    check_img_channels,
    is_standard_fir,
    unreadable,
)
from factory.backbones.stylegan2 import StyleGAN2Arch
from factory.config import ConfigError


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
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"a tensor storage stored as a {type(data).__name__}, not bytes")
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
    except Exception as e:  # noqa: BLE001 - whatever parsing bad bytes raises (torch.load of a storage: AssertionError)
        raise unreadable(path, "pickle", e) from None

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
    except (TypeError, AttributeError, LookupError, ArithmeticError) as e:  # a record whose state is not a module's
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


def _official_architecture(path: str, taken: str, g: PersistentRecord) -> StyleGAN2Arch:
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
        arch = StyleGAN2Arch(
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
            embed_features=_width(mapping_kwargs, "embed_features", mods.get("mapping.embed"), 0),
            layer_features=_width(mapping_kwargs, "layer_features", fc[0] if fc else None, 0),
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: its architecture is not one this project runs: {e}") from None
    check_img_channels(arch, where)
    return arch


def _width(mapping_kwargs: dict, name: str, layer: PersistentRecord | None, axis: int) -> int | None:
    """A mapping width (`embed_features`, `layer_features`): as `mapping_kwargs` sets it, else as the
    layer that has it is shaped (its weight's `axis`), else None (w_dim). The strict load checks that
    every layer's shape agrees."""
    if mapping_kwargs.get(name) is not None:
        return int(mapping_kwargs[name])
    weight = (layer.state.get("_parameters") or {}).get("weight") if layer is not None else None
    return int(weight.shape[axis]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


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
                if not is_standard_fir(t):
                    raise ValueError(f"{path}: {taken}.{key} is not the [1,3,3,1] filter (resample_filter="
                                     f"{t.tolist()}); only the official default is supported")
                continue
            tensors[key] = t.float().contiguous() if t.dtype != torch.float32 else t.contiguous()
        for name, child in module.children.items():
            if child is not None and not isinstance(child, PersistentRecord):
                raise ValueError(f"{path}: {taken}.{prefix + '.' if prefix else ''}{name} is a "
                                 f"{type(child).__name__}, not an official StyleGAN2 layer")
    return tensors
