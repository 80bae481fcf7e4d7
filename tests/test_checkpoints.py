"""StyleGAN2 checkpoints users bring: official pickles (read without executing anything), rosinality
.pt, the project's safetensors; conv_clamp, const noise, class conditioning, fp16 blocks; convert,
inspect, identity, storage URLs, and images exported from a user's own latents.

Every checkpoint here is a look-alike the tests build (tests/lookalike.py); the equality with the
official code itself was measured outside the repository (README, "Bring your own StyleGAN2")."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lookalike import (
    canary_source,
    official_names,
    rosinality_checkpoint,
    snapshot,
    stylegan3_snapshot,
    tensorflow_pickle,
    with_noise_const,
)

from factory.backbones import backbone_identity, load_backbone, to_uint8
from factory.backbones import stylegan2_formats as formats
from factory.backbones.gan_inversion import project
from factory.backbones.stylegan2 import StyleGAN2Arch, StyleGAN2Generator, num_ws
from factory.backbones.stylegan2_file import load_stylegan2, save_stylegan2
from factory.cli import main
from factory.config import ConfigError, StyleGAN2Config, load_config

ARCH = StyleGAN2Config(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16,
                       conv_clamp=256.0, num_fp16_res=2)


def generator(arch: StyleGAN2Config = ARCH, seed: int = 0) -> StyleGAN2Generator:
    """A tiny generator with noise inputs switched on and official noise_const buffers."""
    g = StyleGAN2Generator(arch, seed=seed, w_avg_samples=64)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
    return with_noise_const(g, seed).eval()


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "CANARY"
    yield str(path)
    assert not path.exists(), "code from a checkpoint was executed"


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def cfg_for(weights: str, *overrides: str):
    return load_config(None, [f"backbone.weights={weights}", *overrides]).backbone


def images(g: StyleGAN2Generator, seeds=(1, 2), **kwargs) -> torch.Tensor:
    return g.sample(list(seeds), psi=0.7, **kwargs)[1]


@pytest.mark.parametrize("override,message", [
    ("backbone.noise=random", r"backbone.noise must be one of \('seed', 'const'\), got 'random'"),
    ("backbone.dtype=float64", r"backbone.dtype must be one of \('float32', 'float16', 'bfloat16'\)"),
    ("backbone.classes=[2,-1]", r"backbone.classes must list class indices >= 0, got \[2, -1\]"),
    ("annotate.latent_space=x", r"annotate.latent_space must be 'z' or 'w', got 'x'"),
])
def test_new_settings_are_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


# ---- official pickles: read, never executed ---------------------------------------------------


def test_a_plain_pickle_load_of_the_lookalike_runs_its_code(tmp_path):
    """The control: what `pickle.load` with the official names importable does (the canary fires),
    which is what the restricted reader must never do."""
    canary = tmp_path / "CANARY"
    path = write(tmp_path / "snap.pkl", snapshot(generator(), canary_source(str(canary))))
    with official_names(), open(path, "rb") as f:
        pickle.load(f)
    assert canary.exists()


@pytest.mark.parametrize("style", ["ada", "sg3"])
def test_official_pickle_gives_the_generator_bit_for_bit_without_running_code(tmp_path, canary, style):
    g = generator()
    path = write(tmp_path / "network-snapshot-000100.pkl", snapshot(g, canary_source(canary), style=style))
    with official_names():  # even with the official names importable, nothing is resolved through them
        ck = formats.read_checkpoint(path)
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "training"):
        assert name not in sys.modules
    assert ck.format == formats.OFFICIAL and ck.network == "G_ema"
    assert ck.holds == ["D", "G", "G_ema", "augment_pipe", "training_set_kwargs"]
    assert ck.arch == g.cfg  # conv_clamp and fp16 blocks read from the layers where kwargs do not say
    expected = g.state_dict()
    assert set(ck.tensors) == set(expected)
    assert all(torch.equal(ck.tensors[k], expected[k]) for k in expected)
    loaded = formats.load_generator(path)
    assert torch.equal(images(loaded, noise_mode="const"), images(g, noise_mode="const"))
    assert torch.equal(images(loaded), images(g))


def test_g_or_g_ema_and_a_snapshot_without_g_ema(tmp_path, canary):
    ema, raw = generator(seed=0), generator(seed=1)
    path = write(tmp_path / "snap.pkl", snapshot(ema, canary_source(canary), g=raw))
    assert torch.equal(formats.read_checkpoint(path, "G").tensors["synthesis.b4.const"], raw.synthesis.b4.const)
    assert torch.equal(formats.read_checkpoint(path).tensors["synthesis.b4.const"], ema.synthesis.b4.const)
    no_ema = write(tmp_path / "no_ema.pkl", snapshot(ema, canary_source(canary), g=raw, drop=("G_ema",)))
    with pytest.raises(ValueError, match=r"no_ema.pkl holds \['D', 'G', 'augment_pipe', 'training_set_kwargs'\] "
                                         r"but no G_ema .*--network G"):
        formats.read_checkpoint(no_ema)
    out = tmp_path / "raw.safetensors"
    assert main(["weights", "convert", no_ema, str(out), "--network", "G"]) == 0
    assert json.loads((tmp_path / "raw.json").read_text())["network"] == "G"
    assert torch.equal(load_stylegan2(out).synthesis.b4.const, raw.synthesis.b4.const)


def _resnet(canary):
    return snapshot(generator(), canary_source(canary), architecture="resnet")


def _no_noise(canary):
    return snapshot(generator(), canary_source(canary), use_noise=False)


def _truncated(canary):
    data = snapshot(generator(), canary_source(canary))
    return data[: len(data) // 2]


def _os_system(canary):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    return pickle.dumps({"G_ema": Evil()})


def _builtins_eval(canary):
    class Evil:
        def __reduce__(self):
            return eval, (f"open({canary!r}, 'w')",)

    return pickle.dumps([Evil()])


def _corrupt_storage(canary):
    """A snapshot with one byte changed inside a tensor's stored bytes (the nested legacy `torch.save`
    of a storage): its storage key in the list of keys, so torch.load asserts the key is not found."""
    data = snapshot(generator(), canary_source(canary))
    start = data.index(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1])  # the first storage's bytes
    key = re.search(rb"\d{6,}", data[start:]).group()
    second = data.index(key, data.index(key, start) + len(key))
    return data[:second] + (b"1" if key[:1] != b"1" else b"2") + data[second + 1:]


REFUSALS = {
    "resnet": (_resnet, r"uses architecture='resnet' \(synthesis.b4\); only 'skip'"),
    "stylegan3": (lambda c: stylegan3_snapshot(canary_source(c)),
                  r"G_ema is a StyleGAN3 alias-free generator \(networks_stylegan3: synthesis.\['input', 'L0_36_512'\]\)"),
    "no_noise": (_no_noise, r"use_noise=False \(synthesis.b4.conv1\)"),
    "truncated": (_truncated, r"is not a readable pickle \(truncated or corrupt\)"),
    "corrupt_storage": (_corrupt_storage, (r"is not a readable pickle \(truncated or corrupt\): AssertionError: "
                                           r"storage key '\d+' not found")),
    "rgba": (lambda c: snapshot(generator(replace(ARCH, img_channels=4)), canary_source(c)),
             r"rgba.pkl: G_ema has img_channels=4; only 1 \(grayscale, shown as RGB\) and 3 \(RGB\) are supported"),
    "os_system": (_os_system, r"refusing to load the global posix.system: only tensors"),
    "eval": (_builtins_eval, r"refusing to load the global builtins.eval"),
    "tensorflow": (lambda c: tensorflow_pickle(), r"is a TensorFlow StyleGAN pickle \(dnnlib.tflib.network.Network\); "
                                                  r"convert it once with stylegan2-ada-pytorch \(`python legacy.py"),
    "garbage": (lambda c: b"\x80\x04this is no pickle at all", r"is not a readable pickle"),
    "not_a_checkpoint": (lambda c: b"GIF89a....", r"is a file starting with b'GIF89a..', not a StyleGAN2 checkpoint"),
    "a_list": (lambda c: pickle.dumps([1, 2, 3]), r"holds a pickled list, not an official StyleGAN2 snapshot"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_naming_the_file_and_run_nothing(tmp_path, canary, case, capsys):
    build, message = REFUSALS[case]
    path = write(tmp_path / f"{case}.pkl", build(canary))
    with pytest.raises(ValueError, match=message) as err:
        formats.read_checkpoint(path)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)
    assert main(["weights", "inspect", path]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("factory: error:") and "\n" not in printed
    with pytest.raises(ValueError, match=message):
        backbone_identity(cfg_for(path))


def test_missing_weights_file_exits_2(tmp_path, capsys):
    assert main(["weights", "inspect", str(tmp_path / "nope.pkl")]) == 2
    assert "nope.pkl" in capsys.readouterr().err


# ---- what an official snapshot uses ----------------------------------------------------------------


def test_conv_clamp_clamps_each_layer_and_torgb_after_bias_activation_and_gain():
    g = generator()
    layer = g.synthesis.b8.conv1
    with torch.no_grad():
        layer.bias.add_(torch.linspace(-900, 900, layer.bias.numel()))  # drives outputs past +-256
        gen = torch.Generator().manual_seed(3)
        x, w = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, generator=gen)
        noise = torch.randn(2, 1, 8, 8, generator=gen)
        styles = layer.affine(w)
        wts = layer.weight[None] * styles[:, None, :, None, None]
        wts = wts * (wts.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
        conv = torch.cat([F.conv2d(x[i : i + 1], wts[i], padding=1) for i in range(2)])
        act = F.leaky_relu(conv + noise * layer.noise_strength + layer.bias[None, :, None, None], 0.2) * 2**0.5
        out = layer(x, w, noise)
        torch.testing.assert_close(out, act.clamp(-256, 256), atol=1e-4, rtol=0)
        assert act.abs().max() > 600 and out.abs().max() == 256  # the clamp is engaged
        rgb = g.synthesis.b8.torgb
        rgb.bias.fill_(400.0)
        assert rgb(out, w).max() == 256 and rgb.conv_clamp == 256
        _, feats = g(g._draw([1])[0], noise=g.make_noise([1]))
        assert feats["b8.conv1"].abs().max() == 256
        unclamped = replace(ARCH, conv_clamp=None)
        free = StyleGAN2Generator(unclamped, w_avg_samples=0)
        free.load_state_dict({k: v for k, v in g.state_dict().items() if "noise_const" not in k}, strict=False)
        free.mapping.w_avg.copy_(g.mapping.w_avg)
        _, free_feats = free(g._draw([1])[0], noise=g.make_noise([1]))
        assert free_feats["b8.conv1"].abs().max() > 256


def test_conv_clamp_is_part_of_the_weights_hash(tmp_path):
    g = generator()
    save_stylegan2(g, tmp_path / "clamped.safetensors")
    free = with_noise_const(StyleGAN2Generator(replace(ARCH, conv_clamp=None), w_avg_samples=0))
    free.load_state_dict(g.state_dict())  # the same tensors, no clamp
    save_stylegan2(free, tmp_path / "free.safetensors")
    a = backbone_identity(cfg_for(str(tmp_path / "clamped.safetensors"))).weights_hash
    b = backbone_identity(cfg_for(str(tmp_path / "free.safetensors"))).weights_hash
    assert a != b


def test_noise_const_is_the_checkpoints_buffers_and_is_refused_without_them(tmp_path, canary):
    g = generator()
    path = write(tmp_path / "snap.pkl", snapshot(g, canary_source(canary)))
    const = load_backbone(cfg_for(path, "backbone.noise=const", "backbone.psi=0.0"))
    expected, _ = g(g._draw([5])[0], psi=0.0, noise=[layer.noise_const[None, None] for layer in g.synthesis.layers()])
    out = const([5, 6])
    assert torch.equal(out.images[:1], to_uint8(expected))
    assert torch.equal(out.images[0], out.images[1])  # psi=0, const noise: nothing depends on the seed
    seeded = load_backbone(cfg_for(path, "backbone.psi=0.0"))([5, 6])
    assert not torch.equal(seeded.images[0], seeded.images[1])
    plain = tmp_path / "no_const.safetensors"
    save_stylegan2(StyleGAN2Generator(ARCH, w_avg_samples=8), plain)
    for build in (backbone_identity, load_backbone):
        with pytest.raises(ConfigError, match=r"backbone.noise=const needs the checkpoint's noise_const buffers, "
                                              r"and .*no_const.safetensors has none"):
            build(cfg_for(str(plain), "backbone.noise=const"))


def test_class_conditional_generators_take_the_class_from_the_seed(tmp_path, canary):
    g = generator(replace(ARCH, c_dim=4))
    path = write(tmp_path / "cond.pkl", snapshot(g, canary_source(canary)))
    assert formats.read_checkpoint(path).arch.c_dim == 4
    backbone = load_backbone(cfg_for(path, "backbone.classes=[1,3]"))
    out = backbone([10, 11, 12])
    assert out.classes == [1, 3, 1]  # classes[seed % 2]
    z, noise = g._draw([10])
    by_class = [g(z, psi=0.7, noise=noise, c=F.one_hot(torch.tensor([c]), 4).float())[0] for c in range(4)]
    assert torch.equal(backbone.generator.sample([10], 0.7, classes=[1])[1], by_class[1])
    assert (by_class[1] - by_class[3]).abs().max() > 1e-3  # the class changes the image
    fixed = load_backbone(cfg_for(path, "backbone.classes=[2]"))([10, 11])
    assert fixed.classes == [2, 2]
    with pytest.raises(ConfigError, match=r"backbone.classes must list the class indices to generate: .*cond.pkl "
                                          r"is class-conditional \(c_dim=4\)"):
        backbone_identity(cfg_for(path))
    with pytest.raises(ConfigError, match=r"backbone.classes has 7, outside .*cond.pkl's 4 classes"):
        load_backbone(cfg_for(path, "backbone.classes=[0,7]"))
    uncond = write(tmp_path / "uncond.pkl", snapshot(generator(), canary_source(canary)))
    with pytest.raises(ConfigError, match=r"backbone.classes=\[1\] but .*uncond.pkl is unconditional \(c_dim=0\)"):
        backbone_identity(cfg_for(uncond, "backbone.classes=[1]"))


def test_every_sample_records_its_class_in_both_shard_formats(tmp_path, canary):
    from conftest import save_untrained_decoder

    from factory.dataset import layout, read
    from factory.decoders.files import load_decoder
    from factory.recipes.labeling import build_shard

    path = write(tmp_path / "cond.pkl", snapshot(generator(replace(ARCH, c_dim=3)), canary_source(canary)))
    cfg = load_config(None, [f"workdir={tmp_path}", f"backbone.weights={path}", "backbone.classes=[0,2]",
                             "decoder.num_heads=2", "generate.formats=[parquet,webdataset]"])
    backbone = save_untrained_decoder(cfg)
    out = cfg.generate.output
    layout.prepare_output(out, "build", {}, overwrite=False)
    record = build_shard(backbone, load_decoder(cfg.generate.decoder), cfg, layout.plan_shards(40, 5, 5)[0], "cfg")
    layout.write_manifest(out, {"format": layout.FORMAT, "build_hash": "build", "config_hash": "cfg",
                                "task": "segmentation", "labels": ["background", "blue"],
                                "formats": ["parquet", "webdataset"], "num_samples": 5, "num_shards": 1,
                                "complete": True, "shards": [record], "failed": []})
    for fmt in ("parquet", "webdataset"):
        rows = list(read.iter_samples(out, fmt=fmt))
        assert [(r["seed"], r["class_index"]) for r in rows] == [(s, [0, 2][s % 2]) for s in range(40, 45)]


def test_fp16_blocks_run_in_float32_on_cpu_and_in_the_reduced_dtype_on_request(tmp_path):
    g = generator()
    path = tmp_path / "g.safetensors"
    save_stylegan2(g, path)
    exact = load_backbone(cfg_for(str(path)))([3, 4])
    on_cpu = load_backbone(cfg_for(str(path), "backbone.dtype=bfloat16"))
    assert on_cpu.generator.synthesis.reduced_dtype is None and torch.equal(on_cpu([3, 4]).images, exact.images)
    reduced = formats.load_generator(str(path))
    reduced.synthesis.reduced_dtype = torch.bfloat16  # what a CUDA backbone sets; bf16 runs on CPUs too
    seen = []
    for name in ("b4", "b8", "b16"):
        getattr(reduced.synthesis, name).conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    approx = images(reduced)
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]  # the 2 highest resolutions only
    assert approx.dtype == torch.float32
    diff = (approx - images(g)).abs().max()
    assert 0 < diff < 0.1


# ---- rosinality/stylegan2-pytorch ---------------------------------------------------------------


def test_rosinality_checkpoint_is_renamed_to_the_same_generator(tmp_path):
    g = generator(replace(ARCH, conv_clamp=None, num_fp16_res=0))
    path = tmp_path / "550000.pt"
    torch.save(rosinality_checkpoint(g), path)
    ck = formats.read_checkpoint(str(path))
    assert ck.format == formats.ROSINALITY and ck.network == "g_ema" and ck.w_avg == "stored"
    assert ck.arch == g.cfg
    assert set(ck.tensors) == set(g.state_dict())
    assert all(torch.equal(ck.tensors[k], v) for k, v in g.state_dict().items())
    loaded = load_backbone(cfg_for(str(path), "backbone.noise=const"))
    assert torch.equal(loaded.generator.sample([1], 0.7, noise_mode="const")[1], images(g, [1], noise_mode="const"))
    torch.save(rosinality_checkpoint(g, latent_avg=False, args=False), tmp_path / "trained.pt")
    estimated = formats.read_checkpoint(str(tmp_path / "trained.pt"))
    assert estimated.w_avg == "computed" and "latent_avg missing" in estimated.notes[0]
    assert estimated.tensors["mapping.w_avg"].shape == (16,)


class NotAllowed:
    """A class torch.load(weights_only=True) does not rebuild."""


def test_rosinality_refusals(tmp_path):
    g = generator(replace(ARCH, conv_clamp=None, num_fp16_res=0))
    ckpt = rosinality_checkpoint(g)
    ckpt["g_ema"]["extra.weight"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"extra.pt: g_ema has tensors with no counterpart here: \['extra.weight'\]"):
        formats.read_checkpoint(str(tmp_path / "extra.pt"))
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is a torch checkpoint holding \['model'\], not a rosinality"):
        formats.read_checkpoint(str(tmp_path / "other.pt"))
    torch.save({"g_ema": rosinality_checkpoint(g)["g_ema"], "x": NotAllowed()}, tmp_path / "custom.pt")
    with pytest.raises(ValueError, match=r"custom.pt: torch.load\(weights_only=True\) refuses it"):
        formats.read_checkpoint(str(tmp_path / "custom.pt"))
    data = (tmp_path / "extra.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cut.pt is not a readable torch checkpoint"):
        formats.read_checkpoint(str(tmp_path / "cut.pt"))


# ---- convert, inspect, identity, URLs -------------------------------------------------------------


def test_convert_and_inspect_round_trip_with_one_weights_hash(tmp_path, canary, capsys):
    g = generator(replace(ARCH, c_dim=2))
    pkl = write(tmp_path / "ffhq.pkl", snapshot(g, canary_source(canary)))
    out = tmp_path / "converted" / "ffhq.safetensors"
    assert main(["weights", "convert", pkl, str(out)]) == 0
    record = json.loads((tmp_path / "converted" / "ffhq.json").read_text())
    assert record["source"]["file"] == "ffhq.pkl" and record["source"]["format"] == "official pickle"
    assert record["source"]["sha256"] == hashlib.sha256((tmp_path / "ffhq.pkl").read_bytes()).hexdigest()
    assert record["network"] == "G_ema" and record["architecture"]["c_dim"] == 2
    assert record["architecture"]["conv_clamp"] == 256.0 and record["noise_const"] and record["factory_version"]
    converted = load_stylegan2(out)
    assert converted.cfg == g.cfg and torch.equal(images(converted, classes=[1, 0]), images(g, classes=[1, 0]))
    capsys.readouterr()
    shown = []
    for path in (pkl, str(out)):
        assert main(["weights", "inspect", path, "--json"]) == 0
        shown.append(json.loads(capsys.readouterr().out))
    keys = ("resolution", "z_dim", "w_dim", "mapping_layers", "channels", "conditioning", "w_avg_norm", "conv_clamp",
            "num_fp16_res", "noise_const", "tensors", "parameters", "weights_hash")
    assert [shown[0][k] for k in keys] == [shown[1][k] for k in keys]
    assert shown[0]["weights_hash"] == record["weights_hash"] and shown[0]["conditioning"] == "class-conditional, c_dim=2"
    assert "converted from ffhq.pkl" in shown[1]["notes"][0]
    assert main(["weights", "inspect", pkl]) == 0
    text = capsys.readouterr().out
    assert "official pickle (holds D, G, G_ema, augment_pipe, training_set_kwargs; generator taken: G_ema)" in text
    identities = [backbone_identity(cfg_for(p, "backbone.classes=[0]")) for p in (pkl, str(out))]
    assert identities[0] == identities[1]  # a decoder fitted on either is accepted with the other
    assert identities[0] == load_backbone(cfg_for(pkl, "backbone.classes=[0]")).identity


def test_pickle_identity_is_cached_beside_it_and_builds_no_model(tmp_path, canary, monkeypatch):
    path = write(tmp_path / "snap.pkl", snapshot(generator(), canary_source(canary)))
    first = backbone_identity(cfg_for(path))
    assert (tmp_path / ".snap.pkl.factory-checkpoint.json").is_file()
    monkeypatch.setattr(formats, "read_checkpoint", lambda *a, **k: pytest.fail("read the pickle again"))
    monkeypatch.setattr("factory.backbones.gan.load_generator", lambda *a, **k: pytest.fail("built a model"))
    assert backbone_identity(cfg_for(path)) == first


def test_weights_and_conversion_from_a_storage_url(tmp_path, canary, s3_bucket):
    from factory import storage

    g = generator()
    local = write(tmp_path / "snap.pkl", snapshot(g, canary_source(canary)))
    url = f"{s3_bucket}/models/snap.pkl"
    storage.put_file(local, url, keep_source=True)
    cfg = load_config(None, [f"backbone.weights={url}", f"storage.endpoint_url={storage.current().endpoint_url}"])
    assert backbone_identity(cfg.backbone) == backbone_identity(cfg_for(local))
    assert torch.equal(load_backbone(cfg.backbone)([1]).images, load_backbone(cfg_for(local))([1]).images)
    assert formats.convert(url, f"{s3_bucket}/models/snap.safetensors")["source"]["url"] == url
    assert storage.read_json(f"{s3_bucket}/models/snap.json")["network"] == "G_ema"
    fetched = storage.fetch(f"{s3_bucket}/models/snap.safetensors")
    assert torch.equal(load_stylegan2(fetched).synthesis.b4.const, g.synthesis.b4.const)
    assert storage.fetch(f"{s3_bucket}/models/snap.safetensors") == fetched  # cached while unchanged


# ---- grayscale generators, image channels, mapping widths, corrupt files ------------------------

GRAY = replace(ARCH, img_channels=1)


def test_a_grayscale_generator_gives_rgb_images_with_its_channel_repeated(tmp_path, canary, capsys):
    from factory.dataset.sample import Codec, encode_image

    g = generator(GRAY)
    pkl = write(tmp_path / "gray.pkl", snapshot(g, canary_source(canary)))
    torch.save(rosinality_checkpoint(generator(replace(GRAY, conv_clamp=None, num_fp16_res=0))), tmp_path / "gray.pt")
    for path, gen in ((pkl, g), (str(tmp_path / "gray.pt"), None)):
        backbone = load_backbone(cfg_for(path, "backbone.rgb_taps=true"))
        out = backbone([1, 2])
        assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == torch.uint8
        assert torch.equal(out.images[..., 0], out.images[..., 1]) and torch.equal(out.images[..., 0], out.images[..., 2])
        if gen is not None:
            assert torch.equal(out.images[..., :1], to_uint8(gen.sample([1, 2], backbone.psi)[1]))
        assert out.features[backbone.feature_names.index("b16.rgb")].shape[1] == 1  # the tap keeps its channel
        assert encode_image(out.images[0].numpy(), Codec())  # what export and the shards write
    capsys.readouterr()
    assert main(["weights", "inspect", pkl]) == 0
    assert "image         1 channel (grayscale: the backbone repeats it to RGB)" in capsys.readouterr().out
    assert formats.inspect(pkl)["img_channels"] == 1


def test_a_grayscale_generator_inverts_its_own_image(tmp_path, canary):
    pkl = write(tmp_path / "gray.pkl", snapshot(generator(GRAY), canary_source(canary)))
    backbone = load_backbone(cfg_for(pkl, "backbone.inversion_steps=2"))
    image = backbone([5]).images  # RGB, its gray channel repeated
    _, noise, _ = backbone.generator.inputs([5], "seed")
    start = project(backbone.generator, image, noise, steps=1, lr=1e-9)  # w_avg everywhere
    fit = project(backbone.generator, image, noise, steps=20, lr=0.1)
    assert fit.reconstructions.shape == (1, 3, 16, 16)  # compared as RGB, like the target
    assert fit.mse[0] < 0.2 * start.mse[0], (start.mse, fit.mse)  # measured: 1.40 -> 0.086
    features = backbone.invert(image.numpy(), None, [5])
    assert [f.shape for f in features] == [f.shape for f in backbone([5]).features]


def test_img_channels_other_than_1_or_3_are_refused_in_every_format(tmp_path, capsys):
    rgba = generator(replace(ARCH, img_channels=4, conv_clamp=None, num_fp16_res=0))
    torch.save(rosinality_checkpoint(rgba), tmp_path / "rgba.pt")
    save_stylegan2(rgba, tmp_path / "rgba.safetensors")  # as a pretraining run with img_channels=4 writes it
    message = r"has img_channels=4; only 1 \(grayscale, shown as RGB\) and 3 \(RGB\) are supported"
    for path in (str(tmp_path / "rgba.pt"), str(tmp_path / "rgba.safetensors")):
        with pytest.raises(ValueError, match=message):
            load_backbone(cfg_for(path))
        assert main(["weights", "convert", path, str(tmp_path / "out.safetensors")]) == 2
        assert main(["weights", "inspect", path]) == 2
        assert path in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ConfigError, match=r"backbone.stylegan2.img_channels must be 1 \(grayscale, shown as RGB\) "
                                          r"or 3 \(RGB\), got 4"):
        load_backbone(load_config(None, ["backbone.stylegan2.img_channels=4"]).backbone)


def test_a_truncated_legacy_torch_file_is_refused_in_one_line(tmp_path, capsys):
    """A rosinality checkpoint saved in torch's legacy (pre-zip) format and cut anywhere: whatever the
    parser raises (struct.error, IndexError, EOFError ...), one line naming the file, exit 2."""
    buf = io.BytesIO()
    torch.save(rosinality_checkpoint(generator(replace(ARCH, conv_clamp=None, num_fp16_res=0))), buf,
               _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    path = tmp_path / "cut.pt"
    kinds = set()
    for cut in [*range(40, 400, 3), *range(400, len(data), len(data) // 20)]:
        path.write_bytes(data[:cut])
        # (a cut inside a class name reads as that name's prefix, a global torch refuses: also one line)
        with pytest.raises(ValueError, match=r"cut.pt( is not a readable torch checkpoint \(truncated or corrupt\)|"
                                             r": torch.load\(weights_only=True\) refuses it .*Unsupported global)") as err:
            formats.read_checkpoint(str(path))
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value) and "\x1b" not in str(err.value)
        kinds.add(str(err.value).split(": ")[1])
    assert {"struct.error", "IndexError"} <= kinds, kinds  # the two that once escaped as tracebacks
    path.write_bytes(data[:57])
    assert main(["weights", "inspect", str(path)]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith(f"factory: error: {path} is not a readable torch checkpoint") and "\n" not in printed


WIDE = StyleGAN2Arch(**asdict(replace(ARCH, c_dim=3, mapping_layers=3)), embed_features=8, layer_features=24)
"""Official `mapping_kwargs.embed_features` and `layer_features` other than w_dim (16)."""


def test_mapping_widths_other_than_w_dim_load_convert_and_map_as_the_official_network(tmp_path, canary, capsys):
    g = generator(WIDE)
    assert g.state_dict()["mapping.embed.weight"].shape == (8, 3)
    pkl = write(tmp_path / "wide.pkl", snapshot(g, canary_source(canary)))
    ck = formats.read_checkpoint(pkl)
    assert (ck.arch.embed_features, ck.arch.layer_features) == (8, 24) and ck.arch == g.cfg
    shapes = {k: tuple(v.shape) for k, v in ck.tensors.items() if k.startswith("mapping.") and k.endswith("weight")}
    assert shapes == {"mapping.embed.weight": (8, 3), "mapping.fc0.weight": (24, 16 + 8),
                      "mapping.fc1.weight": (24, 24), "mapping.fc2.weight": (16, 24)}
    out = tmp_path / "wide.safetensors"
    assert main(["weights", "convert", pkl, str(out)]) == 0
    converted = load_stylegan2(out)
    assert converted.cfg == g.cfg
    assert torch.equal(images(converted, classes=[2, 0]), images(formats.load_generator(pkl), classes=[2, 0]))
    assert torch.equal(images(converted, classes=[2, 0]), images(g, classes=[2, 0]))

    # The mapping, computed here from the file's tensors: z and the embedded class each normalised by
    # their 2nd moment, concatenated, then equalised-lr FCs with leaky ReLU (gain sqrt 2).
    t, lr = ck.tensors, WIDE.mapping_lr_multiplier
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    c = F.one_hot(torch.tensor([2, 0]), 3).float()

    def norm(x):
        return x / (x.pow(2).mean(1, keepdim=True) + 1e-8).sqrt()

    y = c @ (t["mapping.embed.weight"] / 3**0.5).T + t["mapping.embed.bias"]
    x = torch.cat([norm(z), norm(y)], 1)
    for i in range(3):
        weight = t[f"mapping.fc{i}.weight"]
        x = F.leaky_relu(x @ (weight * lr / weight.shape[1] ** 0.5).T + t[f"mapping.fc{i}.bias"] * lr, 0.2) * 2**0.5
    torch.testing.assert_close(converted.mapping(z, c=c), x, rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    shown = []
    for path in (pkl, str(out)):
        assert main(["weights", "inspect", path, "--json"]) == 0
        shown.append(json.loads(capsys.readouterr().out))
    assert [(s["embed_features"], s["layer_features"], s["weights_hash"]) for s in shown] == [(8, 24, shown[0]["weights_hash"])] * 2
    assert main(["weights", "inspect", pkl]) == 0
    assert "mapping       z 16 + class embedding 8 -> 24 -> 24 -> w 16" in capsys.readouterr().out
    assert backbone_identity(cfg_for(pkl, "backbone.classes=[1]")) == backbone_identity(cfg_for(str(out), "backbone.classes=[1]"))


# ---- images from a user's own latents ------------------------------------------------------------


@pytest.mark.parametrize("space", ["z", "w"])
def test_annotate_export_renders_a_users_latents_and_training_regenerates_them(tmp_path, canary, space):
    from factory.data.annotations import load_labeled_set
    from factory.recipes.annotate import export_images, import_labels
    from factory.recipes.objectives import regenerate
    from factory.toy.annotator import annotate_by_rule

    g = generator()
    pkl = write(tmp_path / "snap.pkl", snapshot(g, canary_source(canary)))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 16, generator=gen)
    latents = z if space == "z" else g.mapping(z, psi=0.5).detach()
    saved = latents.numpy() if space == "z" else np.repeat(latents.numpy()[:, None], num_ws(ARCH), axis=1)
    np.save(tmp_path / "latents.npy", saved)
    cfg = load_config(None, [f"workdir={tmp_path}", f"backbone.weights={pkl}", "backbone.noise=const",
                             f"annotate.latents={tmp_path / 'latents.npy'}", f"annotate.latent_space={space}",
                             "train.val_images=1"])
    export_images(cfg)
    export = json.loads((tmp_path / "annotations" / "export.json").read_text())
    assert export["latents"]["space"] == space and len(export["images"]) == 5
    assert torch.equal(torch.tensor([r["latent"] for r in export["images"]]), latents)
    if space == "z":
        expected = g(z, psi=0.7, noise=g.const_noise(5))[0]
    else:
        expected = g.synthesize(latents, noise=g.const_noise(5))[0]
    backbone = load_backbone(cfg.backbone)
    torch.testing.assert_close(backbone.render(latents, space, list(range(5))).images.float(),
                               ((expected.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1), atol=1, rtol=0)
    annotate_by_rule(cfg.annotate.dir)
    import_labels(cfg)
    labeled = load_labeled_set(cfg.train.labeled)
    assert labeled.latent_space == space and torch.equal(labeled.latents, latents)
    assert regenerate(labeled, backbone)[0].shape[0] == 5  # raises if an image differs from its export
    again = backbone.render(labeled.latents_of(list(range(5))), space, list(range(5)))
    assert torch.equal(again.images, labeled.images)


@pytest.mark.parametrize("array,space,message", [
    (np.zeros((3, 7), np.float32), "z", r"shape \[3, 7\], expected \[N, 16\] for annotate.latent_space=z"),
    (np.zeros((3, 6, 16), np.float32) + np.arange(6)[None, :, None], "w", r"its 6 per-layer w differ \(style mixing\)"),
    (np.zeros((3, 16), np.int64), "z", r"holds int64, expected float latents"),
    (np.array([{"a": 1}], dtype=object), "z", r"not a readable numeric .npy array"),
])
def test_bad_latents_are_refused_naming_the_key(tmp_path, canary, array, space, message):
    from factory.recipes.annotate import export_images

    pkl = write(tmp_path / "snap.pkl", snapshot(generator(), canary_source(canary)))
    np.save(tmp_path / "latents.npy", array, allow_pickle=True)
    cfg = load_config(None, [f"workdir={tmp_path}", f"backbone.weights={pkl}",
                             f"annotate.latents={tmp_path / 'latents.npy'}", f"annotate.latent_space={space}"])
    with pytest.raises(ConfigError, match=r"annotate.latents=.*latents.npy: " + message):
        export_images(cfg)


# ---- the whole demo on a converted checkpoint -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_demo_runs_on_a_converted_official_pickle(tmp_path, canary, ray_cluster, capsys):
    """The shipped toy generator as an official snapshot (conv_clamp 256, fp16 blocks), converted,
    then the whole GAN demo on it through the CLI."""
    from factory.config import shipped_path

    toy = with_noise_const(load_stylegan2(shipped_path("pkg://toy_stylegan2.safetensors")), seed=1)
    toy.cfg = replace(toy.cfg, conv_clamp=256.0, num_fp16_res=3)
    for block in toy.synthesis.blocks():
        for layer in (*[getattr(block, n) for n in block.layer_names], block.torgb):
            layer.conv_clamp = 256.0
    pkl = write(tmp_path / "network-snapshot-000400.pkl", snapshot(toy, canary_source(canary)))
    converted = tmp_path / "toy.safetensors"
    assert main(["weights", "convert", pkl, str(converted)]) == 0
    assert main(["demo", "--workdir", str(tmp_path / "demo"), f"backbone.weights={converted}", "train.steps=60",
                 "generate.num_samples=60", "generate.shard_size=30", "generate.calibration_samples=30",
                 "annotate.num_images=8", "train.val_images=2", "decoder.num_heads=3"]) == 0
    manifest = json.loads((tmp_path / "demo" / "dataset" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_generated"] == 60
    assert manifest["config"]["backbone"]["weights"] == str(converted)
    export = json.loads((tmp_path / "demo" / "annotations" / "export.json").read_text())
    assert export["backbone_hash"] == backbone_identity(cfg_for(pkl)).weights_hash
