from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from factory.backbones import stylegan2_formats as formats
from factory.backbones.stylegan2 import (
    StyleGAN2Arch,
    StyleGAN2Generator,
    as_arch,
    modulated_conv2d,
    upsample2d,
)
from factory.backbones.stylegan2_file import (
    load_stylegan2,
    read_architecture,
    save_stylegan2,
)
from factory.config import ConfigError, StyleGAN2Config

CFG = StyleGAN2Config(resolution=16, z_dim=32, w_dim=32, mapping_layers=2, channel_base=256, channel_max=32)
NAMES = ["b4.conv1", "b8.conv0", "b8.conv1", "b16.conv0", "b16.conv1"]


def tiny(seed: int = 0, noise_strength: float = 0.3) -> StyleGAN2Generator:
    """Paper init leaves noise_strength at 0; tests set it so the noise path is exercised."""
    g = StyleGAN2Generator(CFG, seed=seed, w_avg_samples=512)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(noise_strength)
    return g.eval()


@pytest.fixture(scope="module")
def model() -> StyleGAN2Generator:
    return tiny()


def test_feature_info_order_and_channels(model: StyleGAN2Generator) -> None:
    assert model.feature_info() == [("b4.conv1", 32, 4), ("b8.conv0", 32, 8), ("b8.conv1", 32, 8),
                                    ("b16.conv0", 16, 16), ("b16.conv1", 16, 16)]
    assert [n for n, _, _ in model.feature_info(rgb_taps=True)] == [
        "b4.conv1", "b4.rgb", "b8.conv0", "b8.conv1", "b8.rgb", "b16.conv0", "b16.conv1", "b16.rgb"]
    assert model.noise_shapes() == [(4, 4), (8, 8), (8, 8), (16, 16), (16, 16)]


@pytest.mark.parametrize("rgb_taps", [False, True])
def test_forward_shapes_match_feature_info(model: StyleGAN2Generator, rgb_taps: bool) -> None:
    z, img, feats = model.sample([1, 2], psi=0.7, rgb_taps=rgb_taps)
    assert z.shape == (2, 32) and img.shape == (2, 3, 16, 16) and img.dtype == torch.float32
    info = model.feature_info(rgb_taps=rgb_taps)
    assert list(feats) == [n for n, _, _ in info]
    for name, c, r in info:
        assert feats[name].shape == (2, c, r, r), name
    if rgb_taps:
        assert torch.equal(feats["b16.rgb"], img)
    assert (feats["b8.conv1"] < 0).any() and (feats["b8.conv1"] >= 0).any()


def test_same_seed_is_bitwise_reproducible(model: StyleGAN2Generator) -> None:
    z1, img1, f1 = model.sample([7, 11], psi=0.5)
    z2, img2, f2 = model.sample([7, 11], psi=0.5)
    other = tiny(seed=0)
    z3, img3, f3 = other.sample([7, 11], psi=0.5)
    assert torch.equal(z1, z2) and torch.equal(z1, z3)
    assert torch.equal(img1, img2) and torch.equal(img1, img3)
    for k in f1:
        assert torch.equal(f1[k], f2[k]) and torch.equal(f1[k], f3[k]), k
    assert torch.equal(z1[0], torch.randn(32, generator=torch.Generator().manual_seed(7)))


def test_init_is_seeded_locally() -> None:
    torch.manual_seed(123)
    a = StyleGAN2Generator(CFG, seed=3).state_dict()
    torch.manual_seed(456)
    b = StyleGAN2Generator(CFG, seed=3).state_dict()
    c = StyleGAN2Generator(CFG, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["synthesis.b8.conv0.weight"], c["synthesis.b8.conv0.weight"])
    assert torch.equal(a["synthesis.b8.conv0.affine.bias"], torch.ones(32))
    assert a["mapping.w_avg"].abs().sum() > 0


def test_batch_composition_independence(model: StyleGAN2Generator) -> None:
    _, single, fs = model.sample([5], psi=0.7)
    _, batch, fb = model.sample([3, 5, 9], psi=0.7)
    torch.testing.assert_close(batch[1:2], single, atol=1e-5, rtol=0)
    for k in fs:
        torch.testing.assert_close(fb[k][1:2], fs[k], atol=1e-5, rtol=0)
    noise = model.make_noise([3, 5, 9])
    for n_single, n_batch in zip(model.make_noise([5]), noise):
        assert torch.equal(n_batch[1:2], n_single)


def test_skip_rgb_is_fir_upsampled_sum(model: StyleGAN2Generator) -> None:
    z, noise = model._draw([1, 2])
    _, feats = model(z, psi=0.7, noise=noise, rgb_taps=True)
    with torch.no_grad():
        w = model.mapping(z, psi=0.7)
        rgb16 = upsample2d(feats["b8.rgb"]) + model.synthesis.b16.torgb(feats["b16.conv1"], w)
    torch.testing.assert_close(feats["b16.rgb"], rgb16, atol=1e-6, rtol=0)


def test_different_seeds_differ(model: StyleGAN2Generator) -> None:
    _, img, _ = model.sample([1, 2], psi=1.0)
    assert (img[0] - img[1]).abs().mean() > 1e-2


def test_psi_zero_collapses_to_w_avg(model: StyleGAN2Generator) -> None:
    z, _ = model._draw([1, 2, 3])
    w = model.mapping(z, psi=0.0)
    assert torch.equal(w, model.mapping.w_avg.expand_as(w))
    shared = [n[:1].expand(3, -1, -1, -1) for n in model.make_noise([4])]
    img_same_noise, _ = model(z, psi=0.0, noise=shared)
    torch.testing.assert_close(img_same_noise[1], img_same_noise[0], atol=1e-6, rtol=0)
    _, img, _ = model.sample([1, 2], psi=0.0)
    assert (img[0] - img[1]).abs().max() > 1e-3
    img_no_noise, _ = tiny(noise_strength=0.0).sample([1, 2], psi=0.0)[1:]
    torch.testing.assert_close(img_no_noise[1], img_no_noise[0], atol=1e-6, rtol=0)


def test_noise_none_is_zero_noise_and_noise_is_used(model: StyleGAN2Generator) -> None:
    z, noise = model._draw([1, 2])
    img_none, _ = model(z, psi=0.7)
    img_zero, _ = model(z, psi=0.7, noise=[torch.zeros_like(n) for n in noise])
    img_noise, _ = model(z, psi=0.7, noise=noise)
    assert torch.equal(img_none, img_zero)
    assert (img_none - img_noise).abs().max() > 1e-3
    with pytest.raises(ValueError, match="noise\\[1\\] must end in \\(8, 8\\)"):
        model(z, noise=[noise[0], noise[0], *noise[2:]])
    with pytest.raises(ValueError, match="5 maps"):
        model(z, noise=noise[:2])


@pytest.mark.parametrize("demodulate,padding,k", [(True, 1, 3), (True, 0, 3), (False, 0, 1)])
def test_modulated_conv_matches_per_sample_loop(demodulate: bool, padding: int, k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 6, generator=gen)
    weight = torch.randn(4, 5, k, k, generator=gen)
    styles = torch.randn(3, 5, generator=gen) + 1.0
    ref = []
    for i in range(3):
        wi = weight * styles[i].reshape(1, 5, 1, 1)
        if demodulate:
            wi = wi / torch.sqrt((wi**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        ref.append(F.conv2d(x[i : i + 1], wi, padding=padding))
    out = modulated_conv2d(x, weight, styles, demodulate, padding)
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=0)


def test_upsample_fir_matches_bilinear_interior() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    up = upsample2d(x)
    bil = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert up.shape == (2, 3, 10, 10)
    torch.testing.assert_close(up[..., 1:-1, 1:-1], bil[..., 1:-1, 1:-1], atol=1e-6, rtol=0)
    assert not torch.allclose(up[..., 0, :], bil[..., 0, :])
    torch.testing.assert_close(upsample2d(x, padding=0)[..., 1:-1, 1:-1], up, atol=1e-6, rtol=0)


def test_up_conv_matches_zero_insert_fir_reference(model: StyleGAN2Generator) -> None:
    """Reference semantics of the official layout's up-conv: zero-insert x2, pad (3, 2), [1,3,3,1]
    FIR with gain 4, then a *true* 3x3 convolution; noise off, then bias and scaled leaky ReLU."""
    layer = model.synthesis.b8.conv0
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, 4, 4, generator=gen)
    w = torch.randn(2, 32, generator=gen)
    up = torch.zeros(2, 32, 8, 8)
    up[..., ::2, ::2] = x
    up = F.pad(up, (3, 2, 3, 2))
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 4
    up = F.conv2d(up, torch.outer(f, f).expand(32, 1, 4, 4), groups=32)
    styles = layer.affine(w)
    ref = []
    for i in range(2):
        wi = layer.weight.flip([2, 3]) * styles[i].reshape(1, -1, 1, 1)
        wi = wi / torch.sqrt((wi**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        ref.append(F.conv2d(up[i : i + 1], wi))
    ref = F.leaky_relu(torch.cat(ref) + layer.bias.reshape(1, -1, 1, 1), 0.2) * 2**0.5
    with torch.no_grad():
        torch.testing.assert_close(layer(x, w, None), ref.detach(), atol=1e-5, rtol=0)


def test_state_dict_uses_ada_key_names(model: StyleGAN2Generator) -> None:
    sd = model.state_dict()
    expected = {"mapping.w_avg": (32,), "mapping.fc0.weight": (32, 32), "mapping.fc1.bias": (32,),
                "synthesis.b4.const": (32, 4, 4), "synthesis.b16.conv0.weight": (16, 32, 3, 3),
                "synthesis.b16.conv0.affine.weight": (32, 32), "synthesis.b16.conv1.affine.weight": (16, 32)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    layer_keys = ["affine.weight", "affine.bias", "weight", "bias", "noise_strength"]
    want = {"mapping.w_avg"} | {f"mapping.fc{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    want |= {"synthesis.b4.const"} | {f"synthesis.b4.conv1.{p}" for p in layer_keys}
    for r in (8, 16):
        want |= {f"synthesis.b{r}.conv{j}.{p}" for j in (0, 1) for p in layer_keys}
    for r in (4, 8, 16):
        want |= {f"synthesis.b{r}.torgb.{p}" for p in ["affine.weight", "affine.bias", "weight", "bias"]}
    assert set(sd) == want
    assert sd["synthesis.b8.conv1.noise_strength"].shape == ()


def test_save_load_round_trip(model: StyleGAN2Generator, tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    save_stylegan2(model, path)
    loaded = load_stylegan2(path)
    assert loaded.cfg == model.cfg == as_arch(CFG) and not loaded.training
    assert torch.equal(loaded.mapping.w_avg, model.mapping.w_avg)
    _, a, fa = model.sample([4, 8], psi=0.6, rgb_taps=True)
    _, b, fb = loaded.sample([4, 8], psi=0.6, rgb_taps=True)
    assert torch.equal(a, b) and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert isinstance(load_stylegan2(path, cfg=replace(CFG)), StyleGAN2Generator)


def _write(path: Path, tensors: dict[str, torch.Tensor], cfg: StyleGAN2Config | None = CFG) -> Path:
    meta = {"format": "factory.stylegan2", "config": json.dumps(asdict(cfg))} if cfg else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def test_load_reports_missing_unexpected_and_shape_mismatch(model: StyleGAN2Generator, tmp_path: Path) -> None:
    sd = dict(model.state_dict())
    del sd["synthesis.b8.conv1.noise_strength"]
    sd["synthesis.b8.extra"] = torch.zeros(2)
    sd["synthesis.b16.torgb.weight"] = torch.zeros(3, 8, 1, 1)
    path = _write(tmp_path / "bad.safetensors", sd)
    with pytest.raises(ValueError) as err:
        load_stylegan2(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys: ['synthesis.b8.conv1.noise_strength']" in msg
    assert "unexpected keys: ['synthesis.b8.extra']" in msg
    assert "synthesis.b16.torgb.weight expected (3, 16, 1, 1) found (3, 8, 1, 1)" in msg


def test_load_config_mismatch_names_field(model: StyleGAN2Generator, tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    save_stylegan2(model, path)
    with pytest.raises(ValueError, match=r"stylegan2\.channel_max: given 64, file has 32"):
        load_stylegan2(path, cfg=replace(CFG, channel_max=64))


def test_load_without_metadata_needs_cfg(model: StyleGAN2Generator, tmp_path: Path) -> None:
    path = _write(tmp_path / "plain.safetensors", model.state_dict(), cfg=None)
    with pytest.raises(ValueError, match="no factory.stylegan2 config metadata"):
        load_stylegan2(path)
    assert torch.equal(load_stylegan2(path, cfg=CFG).mapping.w_avg, model.mapping.w_avg)


def test_a_file_without_mapping_widths_reads_them_as_w_dim_with_the_same_hash(model: StyleGAN2Generator,
                                                                               tmp_path: Path) -> None:
    """Files written before the architecture stored embed_features/layer_features (the config had
    only StyleGAN2Config's fields) load as before, with the same weights hash as a file written now."""
    old = _write(tmp_path / "old.safetensors", model.state_dict())  # StyleGAN2Config's fields only
    assert "embed_features" not in asdict(CFG)
    arch = read_architecture(str(old))
    assert (arch.embed_features, arch.layer_features) == (32, 32) and arch == model.cfg
    new = tmp_path / "new.safetensors"
    save_stylegan2(model, new)
    with safe_open(str(new), "pt") as f:
        stored = json.loads(f.metadata()["config"])
    assert (stored["embed_features"], stored["layer_features"]) == (32, 32)  # a file written now stores them
    assert formats.weights_info(str(old)).weights_hash == formats.weights_info(str(new)).weights_hash
    _, a, _ = load_stylegan2(old).sample([3], psi=0.6)
    assert torch.equal(a, model.sample([3], psi=0.6)[1])


def test_mapping_widths_shape_the_mapping_as_the_official_network() -> None:
    arch = StyleGAN2Arch(**asdict(replace(CFG, c_dim=4, mapping_layers=3)), embed_features=5, layer_features=7)
    g = StyleGAN2Generator(arch, seed=1, w_avg_samples=16)
    shapes = {k: tuple(v.shape) for k, v in g.state_dict().items() if k.startswith("mapping.")}
    assert shapes == {"mapping.embed.weight": (5, 4), "mapping.embed.bias": (5,), "mapping.fc0.weight": (7, 32 + 5),
                      "mapping.fc0.bias": (7,), "mapping.fc1.weight": (7, 7), "mapping.fc1.bias": (7,),
                      "mapping.fc2.weight": (32, 7), "mapping.fc2.bias": (32,), "mapping.w_avg": (32,)}
    assert g.sample([1], classes=[3])[1].shape == (1, 3, 16, 16)
    # unused widths record w_dim: no embedding without classes, no hidden layer in a one-layer mapping
    assert StyleGAN2Arch(**asdict(CFG), embed_features=5).embed_features == 32
    assert StyleGAN2Arch(**asdict(replace(CFG, mapping_layers=1)), layer_features=7).layer_features == 32
    with pytest.raises(ConfigError, match="stylegan2 layer_features must be a positive integer or null, got 0"):
        StyleGAN2Arch(**asdict(CFG), layer_features=0)


def test_load_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable safetensors file"):
        load_stylegan2(garbage)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_stylegan2(missing)


@pytest.mark.parametrize("field,value,needle", [
    ("resolution", 24, "stylegan2.resolution must be a power of two >= 8, got 24"),
    ("resolution", 4, "stylegan2.resolution"),
    ("z_dim", 0, "stylegan2.z_dim must be a positive integer, got 0"),
    ("mapping_layers", 1.5, "stylegan2.mapping_layers"),
    ("channel_max", True, "stylegan2.channel_max"),
    ("channel_base", 8, "stylegan2.channel_base must be >= resolution"),
    ("mapping_lr_multiplier", 0.0, "stylegan2.mapping_lr_multiplier must be > 0"),
    ("w_avg_beta", 1.5, "stylegan2.w_avg_beta must be in [0, 1], got 1.5"),
    ("c_dim", -1, "stylegan2.c_dim must be an integer >= 0, got -1"),
    ("num_fp16_res", 1.5, "stylegan2.num_fp16_res must be an integer >= 0, got 1.5"),
    ("conv_clamp", 0, "stylegan2.conv_clamp must be > 0 or null, got 0"),
])
def test_config_validation_names_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        StyleGAN2Config(**{field: value})
    assert needle in str(err.value)


def test_config_defaults_and_omegaconf() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = StyleGAN2Config()
    assert [cfg.channels(r) for r in cfg.block_resolutions] == [64, 64, 64, 32]
    node = omegaconf.OmegaConf.structured(StyleGAN2Config)
    node.resolution = 64
    assert omegaconf.OmegaConf.to_object(node) == StyleGAN2Config(resolution=64)


def test_compute_w_avg_is_seeded_mean() -> None:
    g = tiny()
    z = torch.randn(256, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = g.mapping(z).mean(0)
    torch.testing.assert_close(g.compute_w_avg(256, seed=9), expected, atol=1e-6, rtol=0)
    w9 = g.mapping.w_avg.clone()
    assert torch.equal(g.compute_w_avg(256, seed=9), w9)
    assert not torch.equal(g.compute_w_avg(256, seed=10), w9)
