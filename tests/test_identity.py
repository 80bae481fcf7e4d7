"""A backbone's identity (weights hash, resolution, features) from its files and config, without
building it: what a driver uses to check a decoder and plan a build, equal to what the built
backbone reports, cached beside the weights, and blind to how the weights are serialised."""

import json
import os

import pytest
import torch

from factory import fingerprint
from factory.backbones import backbone_identity, load_backbone
from factory.backbones.stylegan2 import StyleGAN2Generator
from factory.backbones.stylegan2_file import load_stylegan2, save_stylegan2
from factory.backbones.tiny_diffusion import save_tiny_pipeline
from factory.config import ConfigError, StyleGAN2Config, load_config


def gan_cfg(*overrides):
    return load_config(None, list(overrides)).backbone


def dm_cfg(*overrides):
    return load_config(None, ["backbone.kind=diffusion", "decoder.kind=perception", "backbone.diffusion.steps=2",
                              *overrides]).backbone


def same(identity, backbone):
    return (identity.weights_hash == backbone.weights_hash and identity.resolution == backbone.resolution
            and identity.feature_names == backbone.feature_names
            and identity.feature_channels == backbone.feature_channels)


@pytest.mark.parametrize("rgb_taps", [True, False])
def test_stylegan2_identity_equals_the_built_backbone(tmp_path, rgb_taps):
    path = tmp_path / "g.safetensors"
    save_stylegan2(StyleGAN2Generator(StyleGAN2Config(resolution=16, channel_max=16), seed=3, w_avg_samples=64), path)
    for cfg in (gan_cfg(f"backbone.rgb_taps={rgb_taps}"), gan_cfg(f"backbone.weights={path}", f"backbone.rgb_taps={rgb_taps}")):
        assert same(backbone_identity(cfg), load_backbone(cfg))
    assert backbone_identity(gan_cfg(f"backbone.weights={path}")).resolution == 16


def test_feature_resolutions_select_blocks_in_the_identity_and_the_features(tmp_path):
    """`backbone.feature_resolutions` keeps the chosen blocks' taps (conv layers and skip images), in
    the generator's order, with the values the full set has; the identity says the same unbuilt."""
    path = tmp_path / "g.safetensors"
    save_stylegan2(StyleGAN2Generator(StyleGAN2Config(resolution=16, channel_max=16), seed=3, w_avg_samples=64), path)
    full_cfg = gan_cfg(f"backbone.weights={path}")
    full = load_backbone(full_cfg)
    assert full.feature_names[:2] == ["b4.conv1", "b4.rgb"]
    cfg = gan_cfg(f"backbone.weights={path}", "backbone.feature_resolutions=[16,8]")
    chosen = load_backbone(cfg)
    assert chosen.feature_names == ["b8.conv0", "b8.conv1", "b8.rgb", "b16.conv0", "b16.conv1", "b16.rgb"]
    assert same(backbone_identity(cfg), chosen)
    everything, some = full([5, 6]), chosen([5, 6])
    assert torch.equal(everything.images, some.images)
    kept = [everything.features[full.feature_names.index(n)] for n in chosen.feature_names]
    assert [f.shape[-1] for f in some.features] == [8, 8, 8, 16, 16, 16]
    assert all(torch.equal(a, b) for a, b in zip(kept, some.features))
    no_rgb = gan_cfg(f"backbone.weights={path}", "backbone.feature_resolutions=[16]", "backbone.rgb_taps=false")
    assert backbone_identity(no_rgb).feature_names == ["b16.conv0", "b16.conv1"]
    # a decoder fitted on every block is refused by a build that reads fewer, naming the setting
    from factory.recipes.generate import GenerateError, check_decoder_fits

    meta = {"backbone_hash": full.weights_hash, "feature_names": json.dumps(full.feature_names)}
    check_decoder_fits(meta, backbone_identity(full_cfg), "d")
    with pytest.raises(GenerateError, match=r"was fitted on features .* check backbone.feature_resolutions"):
        check_decoder_fits(meta, backbone_identity(cfg), "d")


@pytest.mark.parametrize("setting, message", [
    ("backbone.feature_resolutions=[32]", (r"backbone.feature_resolutions has 32, not a block of .*g.safetensors "
                                           r"\(its blocks: 4, 8, 16\)")),
    ("backbone.feature_resolutions=[8,8]", (r"backbone.feature_resolutions must list block resolutions .* once each, "
                                            r"got \[8, 8\]")),
    ("backbone.feature_resolutions=[2]", r"backbone.feature_resolutions must list .* got \[2\]"),
])
def test_feature_resolutions_outside_the_generator_are_refused_by_name(tmp_path, setting, message):
    path = tmp_path / "g.safetensors"
    save_stylegan2(StyleGAN2Generator(StyleGAN2Config(resolution=16, channel_max=16), seed=3, w_avg_samples=64), path)
    with pytest.raises(ConfigError, match=message):
        backbone_identity(gan_cfg(f"backbone.weights={path}", setting))
    with pytest.raises(ConfigError, match=r"feature_resolutions=\[16\] selects a StyleGAN2's blocks"):
        dm_cfg("backbone.feature_resolutions=[16]")


def test_stylegan2_identity_reads_no_model_and_is_cached_beside_the_file(tmp_path, monkeypatch):
    path = tmp_path / "g.safetensors"
    save_stylegan2(StyleGAN2Generator(StyleGAN2Config(), seed=1, w_avg_samples=64), path)
    cfg = gan_cfg(f"backbone.weights={path}")
    first = backbone_identity(cfg)
    assert (tmp_path / f".g.safetensors{fingerprint.CACHE_FILE}").is_file()
    monkeypatch.setattr(fingerprint, "safetensors_fingerprint", lambda *a, **k: pytest.fail("not cached"))
    monkeypatch.setattr("factory.backbones.gan.load_generator", lambda *a, **k: pytest.fail("built a model"))
    assert backbone_identity(cfg) == first


def test_a_changed_file_gets_a_new_hash_and_a_resave_the_same(tmp_path):
    path = tmp_path / "g.safetensors"
    model = StyleGAN2Generator(StyleGAN2Config(), seed=1, w_avg_samples=64)
    save_stylegan2(model, path)
    before = backbone_identity(gan_cfg(f"backbone.weights={path}")).weights_hash
    save_stylegan2(load_stylegan2(path), tmp_path / "again.safetensors")  # another serialisation
    assert backbone_identity(gan_cfg(f"backbone.weights={tmp_path / 'again.safetensors'}")).weights_hash == before
    with torch.no_grad():
        model.mapping.w_avg.add_(1)
    os.remove(path)
    save_stylegan2(model, path)
    assert backbone_identity(gan_cfg(f"backbone.weights={path}")).weights_hash != before


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("identity") / "pipeline"), seed=0)


@pytest.mark.parametrize("overrides", [[], ["backbone.diffusion.attention_maps=false"],
                                       ["backbone.diffusion.max_prompt_tokens=3", "backbone.diffusion.resolution=32"]])
def test_diffusion_identity_equals_the_built_backbone_without_loading_weights(pipeline_dir, overrides, monkeypatch):
    for weights in (None, pipeline_dir):
        cfg = dm_cfg(*overrides, *([f"backbone.weights={weights}"] if weights else []))
        built = load_backbone(cfg)
        if weights:
            from diffusers import StableDiffusionPipeline

            with monkeypatch.context() as m:
                m.setattr(StableDiffusionPipeline, "from_pretrained",
                          classmethod(lambda *a, **k: pytest.fail("loaded the pipeline")))
                identity = backbone_identity(cfg)
        else:
            identity = backbone_identity(cfg)
        assert same(identity, built)


def test_diffusion_hash_ignores_who_wrote_the_configs_and_sees_the_weights(pipeline_dir, tmp_path):
    import shutil

    base = backbone_identity(dm_cfg(f"backbone.weights={pipeline_dir}")).weights_hash
    copy = tmp_path / "copy"
    shutil.copytree(pipeline_dir, copy, ignore=shutil.ignore_patterns(".*"))
    config = copy / "unet" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "_diffusers_version": "9.9.9"}, indent=4))
    assert backbone_identity(dm_cfg(f"backbone.weights={copy}")).weights_hash == base
    vae = copy / "vae" / "config.json"
    vae.write_text(json.dumps({**json.loads(vae.read_text()), "scaling_factor": 0.5}))  # changes every image
    assert backbone_identity(dm_cfg(f"backbone.weights={copy}")).weights_hash != base
