"""The diffusion backbone on a tiny pipeline built from configs: the user's loading path, feature taps
through hooks and attention processors, inversion without a VAE decode, schedulers, bad weights."""

import json

import numpy as np
import pytest
import torch

from factory.backbones import load_backbone
from factory.backbones.diffusion import PipelineError
from factory.backbones.tiny_diffusion import save_tiny_pipeline
from factory.config import load_config

PROMPTS = ["a photo of a face with red hair", "a bald face", "a face with blond hair on a green background"]


def diffusion_cfg(*overrides):
    return load_config(overrides=["backbone.kind=diffusion", "decoder.kind=perception",
                                  "backbone.diffusion.steps=4", "backbone.batch_invariant=false",
                                  *overrides]).backbone


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny-sd") / "pipeline"), seed=0)


@pytest.fixture(scope="module")
def backbone(pipeline_dir):
    return load_backbone(diffusion_cfg(f"backbone.weights={pipeline_dir}"))


def test_saved_pipeline_loads_through_from_pretrained_and_matches_the_built_one(pipeline_dir, backbone):
    built = load_backbone(diffusion_cfg())  # the same seeded weights, never saved
    assert backbone.weights_hash == built.weights_hash
    a, b = backbone([1, 2, 3], PROMPTS), built([1, 2, 3], PROMPTS)
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (3, 64, 64, 3) and a.images.dtype == torch.uint8
    assert torch.equal(backbone([1, 2, 3], PROMPTS).images, a.images)  # a function of (seed, prompt)
    other = backbone([1, 2, 3], ["a dark square", *PROMPTS[1:]])
    assert not torch.equal(other.images[0], a.images[0]) and torch.equal(other.images[1:], a.images[1:])
    assert a.latents.shape == (3, 0)


def test_features_are_grouped_by_resolution_with_attention_maps(backbone, pipeline_dir):
    out = backbone([5, 6], PROMPTS[:2])
    assert backbone.feature_names == ["res32", "res16"]
    assert [tuple(f.shape) for f in out.features] == [(2, c, r, r) for c, r in zip(backbone.feature_channels, (32, 16))]
    assert all(f.dtype == torch.float32 for f in out.features)
    plain = load_backbone(diffusion_cfg(f"backbone.weights={pipeline_dir}", "backbone.diffusion.attention_maps=false"))
    tokens = backbone.cfg.max_prompt_tokens
    assert plain.feature_channels == [backbone.feature_channels[0], backbone.feature_channels[1] - tokens]
    attention = out.features[1][:, -tokens:]  # token maps: probabilities, each pixel's row sums to <= 1
    assert attention.min() >= 0 and attention.sum(dim=1).max() <= 1 + 1e-5
    assert torch.equal(plain([5, 6], PROMPTS[:2]).images, out.images)  # taps never change the images


def test_image_features_give_the_decoder_the_pixels_it_labels(backbone, pipeline_dir):
    """`image_features`: the image itself at full resolution after the denoiser's maps, the same in
    generation (the sample's own uint8 pixels) and in inversion (the real image), named in the
    identity so a decoder fitted without it is refused."""
    from factory.backbones import backbone_identity

    cfg = diffusion_cfg(f"backbone.weights={pipeline_dir}", "backbone.diffusion.image_features=true")
    with_image = load_backbone(cfg)
    assert with_image.feature_names == [*backbone.feature_names, "rgb64"] == backbone_identity(cfg).feature_names
    assert with_image.feature_channels == [*backbone.feature_channels, 3]
    out, plain = with_image([5, 6], PROMPTS[:2]), backbone([5, 6], PROMPTS[:2])
    assert torch.equal(out.images, plain.images)
    assert all(torch.equal(a, b) for a, b in zip(out.features, plain.features))  # the maps are untouched
    rgb = out.features[-1]
    assert rgb.shape == (2, 3, 64, 64) and torch.equal(rgb, out.images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    inverted = with_image.invert(out.images.numpy(), PROMPTS[:2], [0, 1])
    assert torch.equal(inverted[-1], rgb)  # the same feature for a real image as for a generated one
    assert all(torch.equal(a, b) for a, b in zip(inverted[:-1], backbone.invert(out.images.numpy(), PROMPTS[:2], [0, 1])))
    from factory.recipes.generate import GenerateError, check_decoder_fits

    fitted_without = {"backbone_hash": backbone.weights_hash, "feature_names": json.dumps(backbone.feature_names)}
    with pytest.raises(GenerateError, match="image_features"):  # a decoder fitted without it is refused
        check_decoder_fits(fitted_without, backbone_identity(cfg), "decoder-dir")


def test_taps_leave_the_images_of_the_bare_pipeline_unchanged(backbone, pipeline_dir):
    from diffusers import StableDiffusionPipeline

    bare = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    bare.set_progress_bar_config(disable=True)
    images = bare(PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=64, width=64, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)]).images
    expected = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(backbone([7, 8, 9], PROMPTS).images, expected)


def test_inversion_never_decodes_and_generation_decodes_once_per_batch(backbone, monkeypatch):
    vae = backbone.pipe.vae
    calls = []
    real_decode = vae.decode

    def counting_decode(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", counting_decode)
    monkeypatch.setattr(vae.decoder, "forward", lambda *a, **k: pytest.fail("inversion ran the VAE decoder"))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    features = backbone.invert(images, PROMPTS[:2], [0, 1])
    assert calls == [] and [tuple(f.shape[2:]) for f in features] == [(32, 32), (16, 16)]
    assert all(torch.equal(a, b) for a, b in zip(features, backbone.invert(images, PROMPTS[:2], [0, 1])))
    monkeypatch.undo()
    monkeypatch.setattr(vae, "decode", counting_decode)
    backbone([1, 2, 3], PROMPTS)
    assert calls == [3]


def test_batch_invariant_samples_each_seed_as_if_alone(pipeline_dir):
    b = load_backbone(diffusion_cfg(f"backbone.weights={pipeline_dir}", "backbone.batch_invariant=true"))
    together = b([1, 2, 3], PROMPTS)
    alone = b([2], PROMPTS[1:2])
    assert torch.equal(together.images[1:2], alone.images)
    assert all(torch.equal(f[1:2], g) for f, g in zip(together.features, alone.features))
    assert [f.shape[0] for f in together.features] == [3, 3]


def test_inversion_matches_the_noise_level_of_the_tapped_step(pipeline_dir):
    last = load_backbone(diffusion_cfg(f"backbone.weights={pipeline_dir}"))
    first = load_backbone(diffusion_cfg(f"backbone.weights={pipeline_dir}", "backbone.diffusion.feature_steps=[0]"))
    fixed = load_backbone(diffusion_cfg(f"backbone.weights={pipeline_dir}", "backbone.diffusion.inversion_timestep=250"))
    assert last.inversion_timestep == 1 and first.inversion_timestep == 751 and fixed.inversion_timestep == 250


@pytest.mark.parametrize("scheduler", ["euler", "dpmsolver++"])
def test_other_schedulers_sample_and_tap(pipeline_dir, scheduler):
    b = load_backbone(diffusion_cfg(f"backbone.weights={pipeline_dir}", f"backbone.diffusion.scheduler={scheduler}",
                                    "backbone.diffusion.guidance_scale=1.0"))
    out = b([1, 2], PROMPTS[:2])
    assert out.images.shape == (2, 64, 64, 3) and len(out.features) == 2
    assert torch.equal(b([1, 2], PROMPTS[:2]).images, out.images)


def test_prompts_are_required_and_bad_weights_are_named(backbone, tmp_path):
    with pytest.raises(ValueError, match="one prompt per seed"):
        backbone([1, 2], ["only one"])
    with pytest.raises(PipelineError, match="no pipeline folder at"):
        load_backbone(diffusion_cfg(f"backbone.weights={tmp_path}/missing/pipeline"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"empty has no model_index.json"):
        load_backbone(diffusion_cfg(f"backbone.weights={tmp_path / 'empty'}"))
