"""Look-alike StyleGAN2 checkpoints, built by the tests from their own reading of the formats; no
NVIDIA or rosinality code or file is used.

An official snapshot is a pickled dict (`G`, `D`, `G_ema`, `augment_pipe`, `training_set_kwargs`)
whose networks pickle through `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where
`meta = {type, version, module_src, class_name, state}` and `state` is the nn.Module's `__dict__`
(`_parameters`, `_buffers`, `_modules`, `_init_kwargs`, attributes). Here the reconstructor is a
stand-in that behaves like the official one (it executes `module_src`), importable under the
official name only inside `official_names()`; the module source is a canary that writes a file when
executed. A rosinality checkpoint is a `torch.save`d dict with `g_ema` (its own names), `latent_avg`
and training `args` (an argparse.Namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from factory.backbones.stylegan2 import StyleGAN2Generator, feature_info

_RECONSTRUCTOR = '''
def _reconstruct_persistent_obj(meta):
    """Like the official reconstructor: executes the pickled module source, then builds the class."""
    import types
    module = types.ModuleType("_imported_module_lookalike")
    exec(meta["module_src"], module.__dict__)
    cls = module.__dict__[meta["class_name"]]
    obj = cls.__new__(cls)
    obj.__dict__.update(meta["state"])
    return obj
'''

CLASSES = ("Generator", "MappingNetwork", "FullyConnectedLayer", "SynthesisNetwork", "SynthesisBlock",
           "SynthesisLayer", "ToRGBLayer", "Discriminator", "AugmentPipe", "SynthesisInput")


def canary_source(canary: str) -> str:
    """Module source whose execution writes `canary`, defining every class a snapshot names."""
    return (f"open({canary!r}, 'w').write('the checkpoint ran code')\n"
            f"for _name in {list(CLASSES)!r}:\n    globals()[_name] = type(_name, (), {{}})\n")


@contextlib.contextmanager
def official_names() -> Iterator[types.SimpleNamespace]:
    """`torch_utils.persistence`, `dnnlib.util.EasyDict` and `dnnlib.tflib.network.Network` importable
    under their official names while inside (to pickle look-alikes, or to let a naive loader find them)."""
    persistence = types.ModuleType("torch_utils.persistence")
    exec(_RECONSTRUCTOR, persistence.__dict__)
    util = types.ModuleType("dnnlib.util")
    exec("class EasyDict(dict):\n    pass\n", util.__dict__)
    network = types.ModuleType("dnnlib.tflib.network")
    exec("class Network:\n    def __init__(self, name):\n        self.name = name\n", network.__dict__)
    modules = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
               "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util, "dnnlib.tflib": types.ModuleType("dnnlib.tflib"),
               "dnnlib.tflib.network": network}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(EasyDict=util.EasyDict, Network=network.Network,
                                    reconstruct=persistence._reconstruct_persistent_obj)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class Persistent:
    """An object that pickles the way an official persistent class does."""

    def __init__(self, class_name: str, state: dict, source: str) -> None:
        self.class_name, self.state, self.source = class_name, state, source

    def __reduce__(self):
        reconstruct = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        meta = dict(type="class", version=6, module_src=self.source, class_name=self.class_name, state=self.state)
        return reconstruct, (meta,)


def module_state(params: dict | None = None, buffers: dict | None = None, children: dict | None = None,
                 init_kwargs: dict | None = None, **attrs) -> dict:
    """An nn.Module's `__dict__` as torch keeps it (parameters pickle as nn.Parameter)."""
    hooks = ("_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
             "_load_state_dict_pre_hooks")
    return {
        "training": False,
        "_parameters": OrderedDict((k, torch.nn.Parameter(v.clone(), requires_grad=False))
                                   for k, v in (params or {}).items()),
        "_buffers": OrderedDict((k, v.clone()) for k, v in (buffers or {}).items()),
        "_non_persistent_buffers_set": set(),
        **{h: OrderedDict() for h in hooks},
        "_modules": OrderedDict(children or {}),
        "_init_args": (),
        "_init_kwargs": init_kwargs or {},
        **attrs,
    }


FIR = torch.outer(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0])) / 64
"""The official `upfirdn2d.setup_filter([1, 3, 3, 1])`."""


def with_noise_const(g: StyleGAN2Generator, seed: int = 0) -> StyleGAN2Generator:
    """Give `g` the per-layer noise_const buffers every official generator stores."""
    gen = torch.Generator().manual_seed(seed)
    for layer, (_, _, res) in zip(g.synthesis.layers(), feature_info(g.cfg)):
        layer.noise_const = torch.randn(res, res, generator=gen)
    return g


def official_generator(g: StyleGAN2Generator, source: str, easydict: type, style: str = "ada",
                       architecture: str = "skip", use_noise: bool = True) -> Persistent:
    """`g` as an official Generator record. style "ada": stylegan2-ada-pytorch's init_kwargs (nested
    synthesis_kwargs with conv_clamp and num_fp16_res); "sg3": stylegan3's networks_stylegan2, whose
    Generator passes synthesis kwargs flat and relies on defaults (conv_clamp, num_fp16_res) that only
    the layers' attributes show. Mapping widths other than w_dim go into `mapping_kwargs`, as a user
    sets them (`embed_features`, `layer_features`)."""
    cfg, sd = g.cfg, g.state_dict()
    clamp = None if cfg.conv_clamp is None else int(cfg.conv_clamp)

    def P(name: str, state: dict) -> Persistent:  # noqa: N802
        return Persistent(name, state, source)

    def fc(prefix: str, activation: str, lr: float) -> Persistent:
        w = sd[f"{prefix}.weight"]
        return P("FullyConnectedLayer", module_state(
            {"weight": w, "bias": sd[f"{prefix}.bias"]}, init_kwargs={"in_features": w.shape[1], "out_features": w.shape[0]},
            activation=activation, weight_gain=np.float64(lr / np.sqrt(w.shape[1])), bias_gain=lr))

    def layer(prefix: str, res: int, up: bool) -> Persistent:
        params = {"weight": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}
        buffers = {"resample_filter": FIR}
        if use_noise:
            params["noise_strength"] = sd[f"{prefix}.noise_strength"]
            buffers["noise_const"] = sd[f"{prefix}.noise_const"]
        return P("SynthesisLayer", module_state(
            params, buffers, {"affine": fc(f"{prefix}.affine", "linear", 1.0)}, {"resolution": res},
            resolution=res, up=2 if up else 1, use_noise=use_noise, activation="lrelu", conv_clamp=clamp, padding=1,
            act_gain=np.float64(math.sqrt(2))))

    def torgb(prefix: str) -> Persistent:
        w = sd[f"{prefix}.weight"]
        return P("ToRGBLayer", module_state(
            {"weight": w, "bias": sd[f"{prefix}.bias"]}, children={"affine": fc(f"{prefix}.affine", "linear", 1.0)},
            conv_clamp=clamp, weight_gain=np.float64(1 / np.sqrt(w.shape[1]))))

    blocks = {}
    for res in cfg.block_resolutions:
        p = f"synthesis.b{res}"
        children = {} if res == 4 else {"conv0": layer(f"{p}.conv0", res, True)}
        children |= {"conv1": layer(f"{p}.conv1", res, False), "torgb": torgb(f"{p}.torgb")}
        blocks[f"b{res}"] = P("SynthesisBlock", module_state(
            {"const": sd[f"{p}.const"]} if res == 4 else {}, {"resample_filter": FIR}, children,
            resolution=res, architecture=architecture, use_fp16=res in cfg.fp16_resolutions,
            is_last=res == cfg.resolution, num_conv=len(children) - 1, num_torgb=1))
    synthesis = P("SynthesisNetwork", module_state(children=blocks, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
                                                   block_resolutions=cfg.block_resolutions))
    mapping_children = {"embed": fc("mapping.embed", "linear", 1.0)} if cfg.c_dim else {}
    mapping_children |= {f"fc{i}": fc(f"mapping.fc{i}", "lrelu", cfg.mapping_lr_multiplier)
                         for i in range(cfg.mapping_layers)}
    mapping = P("MappingNetwork", module_state(
        buffers={"w_avg": sd["mapping.w_avg"]}, children=mapping_children,
        z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, num_layers=cfg.mapping_layers, w_avg_beta=cfg.w_avg_beta))
    widths = {k: getattr(cfg, k) for k in ("embed_features", "layer_features") if getattr(cfg, k) != cfg.w_dim}
    kwargs = dict(z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
                  img_channels=cfg.img_channels, mapping_kwargs=easydict(num_layers=cfg.mapping_layers, **widths))
    if style == "ada":
        kwargs["synthesis_kwargs"] = easydict(channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                                              num_fp16_res=4 if cfg.num_fp16_res else 0, conv_clamp=clamp)
    else:
        kwargs |= {"channel_base": cfg.channel_base, "channel_max": cfg.channel_max,
                   "fused_modconv_default": "inference_only"}
    return P("Generator", module_state(children={"synthesis": synthesis, "mapping": mapping}, init_kwargs=kwargs,
                                       z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim))


def snapshot(g_ema: StyleGAN2Generator, source: str, g: StyleGAN2Generator | None = None,
             drop: tuple[str, ...] = (), **kwargs) -> bytes:
    """A whole training snapshot, pickled as the official training loop does (`pickle.dump(dict)`)."""
    with official_names() as names:
        data = {
            "training_set_kwargs": dict(class_name="training.dataset.ImageFolderDataset", path="data.zip",
                                        use_labels=bool(g_ema.cfg.c_dim), resolution=g_ema.cfg.resolution),
            "G": official_generator(g or g_ema, source, names.EasyDict, **kwargs),
            "D": Persistent("Discriminator", module_state({"weight": torch.randn(8, 3, 1, 1)},
                                                          init_kwargs=names.EasyDict(c_dim=g_ema.cfg.c_dim)), source),
            "G_ema": official_generator(g_ema, source, names.EasyDict, **kwargs),
            "augment_pipe": Persistent("AugmentPipe", module_state(buffers={"p": torch.zeros([])}, xflip=1.0), source),
        }
        for name in drop:
            del data[name]
        return pickle.dumps(data)


def stylegan3_snapshot(source: str) -> bytes:
    """A StyleGAN3 (alias-free) snapshot: its synthesis has `input` and `L{i}_{size}_{channels}` layers."""
    with official_names() as names:
        synthesis = Persistent("SynthesisNetwork", module_state(children={
            "input": Persistent("SynthesisInput", module_state({"weight": torch.randn(8, 4)}), source),
            "L0_36_512": Persistent("SynthesisLayer", module_state({"weight": torch.randn(8, 8, 3, 3)}), source),
        }), source)
        mapping = Persistent("MappingNetwork", module_state(buffers={"w_avg": torch.zeros(8)}), source)
        g = Persistent("Generator", module_state(children={"synthesis": synthesis, "mapping": mapping},
                                                 init_kwargs=dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16,
                                                                  img_channels=3, mapping_kwargs=names.EasyDict())), source)
        return pickle.dumps({"G": g, "D": None, "G_ema": g})


def tensorflow_pickle() -> bytes:
    """What an original StyleGAN2 TensorFlow pickle refers to: dnnlib.tflib.network.Network objects."""
    with official_names() as names:
        return pickle.dumps((names.Network("G"), names.Network("D"), names.Network("Gs")))


def rosinality_checkpoint(g: StyleGAN2Generator, latent_avg: bool = True, args: bool = True) -> dict:
    """`g` as a rosinality/stylegan2-pytorch training checkpoint (its names and shapes)."""
    cfg, sd = g.cfg, g.state_dict()
    out = {"input.input": sd["synthesis.b4.const"][None]}
    for i in range(cfg.mapping_layers):
        out[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]

    def styled(ours: str, theirs: str, up: bool) -> None:
        out[f"{theirs}.conv.weight"] = sd[f"{ours}.weight"][None]
        out[f"{theirs}.conv.modulation.weight"] = sd[f"{ours}.affine.weight"]
        out[f"{theirs}.conv.modulation.bias"] = sd[f"{ours}.affine.bias"]
        out[f"{theirs}.noise.weight"] = sd[f"{ours}.noise_strength"].reshape(1)
        out[f"{theirs}.activate.bias"] = sd[f"{ours}.bias"]
        if up:
            out[f"{theirs}.conv.blur.kernel"] = FIR * 4  # rosinality scales the blur by factor**2

    def rgb(ours: str, theirs: str, up: bool) -> None:
        out[f"{theirs}.conv.weight"] = sd[f"{ours}.weight"][None]
        out[f"{theirs}.conv.modulation.weight"] = sd[f"{ours}.affine.weight"]
        out[f"{theirs}.conv.modulation.bias"] = sd[f"{ours}.affine.bias"]
        out[f"{theirs}.bias"] = sd[f"{ours}.bias"].reshape(1, -1, 1, 1)
        if up:
            out[f"{theirs}.upsample.kernel"] = FIR * 4

    styled("synthesis.b4.conv1", "conv1", False)
    rgb("synthesis.b4.torgb", "to_rgb1", False)
    for k, res in enumerate(cfg.block_resolutions[1:]):
        styled(f"synthesis.b{res}.conv0", f"convs.{2 * k}", True)
        styled(f"synthesis.b{res}.conv1", f"convs.{2 * k + 1}", False)
        rgb(f"synthesis.b{res}.torgb", f"to_rgbs.{k}", True)
    for i, (name, _, _) in enumerate(feature_info(cfg)):
        out[f"noises.noise_{i}"] = sd[f"synthesis.{name}.noise_const"][None, None]
    ckpt = {"g_ema": {k: v.clone() for k, v in out.items()}, "g": {k: v.clone() for k, v in out.items()},
            "g_optim": {"state": {}, "param_groups": [{"lr": 0.002, "betas": (0.0, 0.99)}]}, "ada_aug_p": 0.0}
    if latent_avg:
        ckpt["latent_avg"] = sd["mapping.w_avg"].clone()
    if args:
        ckpt["args"] = argparse.Namespace(size=cfg.resolution, n_mlp=cfg.mapping_layers, lr_mlp=cfg.mapping_lr_multiplier)
    return ckpt
