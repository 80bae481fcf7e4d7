"""GAN inversion: real images projected into the generator's W+ (`backbones.gan_inversion`), so a Style
Interpreter can label real photos. Tiny shipped generator, a few images, no Ray."""

import os

import numpy as np
import pytest
import torch

from factory.backbones import load_backbone
from factory.backbones.gan_inversion import project
from factory.backbones.stylegan2 import StyleGAN2Generator, num_ws
from factory.config import ConfigError, StyleGAN2Config, load_config
from factory.data import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def backbone():
    cfg = load_config(None, ["backbone.weights=pkg://toy_stylegan2.safetensors", "backbone.inversion_steps=60",
                             "backbone.inversion_lr=0.1"])
    return load_backbone(cfg.backbone)


def test_w_plus_with_one_w_per_layer_draws_the_same_image_as_that_w():
    g = StyleGAN2Generator(StyleGAN2Config(resolution=16, z_dim=8, w_dim=8, mapping_layers=1, channel_max=8), seed=3)
    w = g.mapping(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)))
    noise = g.make_noise([0, 1])
    image, feats = g.synthesize(w, noise=noise)
    image_plus, feats_plus = g.synthesize(w.unsqueeze(1).repeat(1, num_ws(g.cfg), 1), noise=noise)
    assert torch.equal(image, image_plus) and all(torch.equal(feats[k], feats_plus[k]) for k in feats)
    other = w.unsqueeze(1).repeat(1, num_ws(g.cfg), 1).clone()
    other[:, -1] = 0  # the last w steers the last toRGB only
    changed, changed_feats = g.synthesize(other, noise=noise)
    assert not torch.equal(changed, image) and all(torch.equal(feats[k], changed_feats[k]) for k in feats)
    with pytest.raises(ValueError, match=r"W\+ \[B, 6, w_dim\]"):
        g.synthesize(w.unsqueeze(1).repeat(1, 3, 1), noise=noise)


def test_projection_redraws_generated_and_real_faces_deterministically(backbone):
    g = backbone.generator
    before = {k: v.clone() for k, v in g.state_dict().items()}
    real, _ = toyworld.arrays([1_000_000, 1_000_001], 32)
    images = np.concatenate([backbone([5, 6]).images.numpy(), real])
    _, noise, _ = g.inputs([0, 1, 2, 3], "seed")
    start = project(g, images, noise, steps=1, lr=1e-9)  # the start: w_avg everywhere
    fit = project(g, images, noise, steps=60, lr=0.1)
    assert fit.w_plus.shape == (4, num_ws(g.cfg), g.cfg.w_dim)
    assert (fit.mse < 0.35 * start.mse).all(), (start.mse, fit.mse)  # every image, real ones too
    with torch.inference_mode():  # callable from inference code (the build's actors run in it)
        again = project(g, images, noise, steps=60, lr=0.1)
    assert torch.equal(fit.w_plus, again.w_plus)
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())  # the generator is untouched


def test_invert_gives_the_features_a_decoder_reads(backbone):
    real, _ = toyworld.arrays([1_000_000, 1_000_001, 1_000_002], 32)
    features = backbone.invert(real, None, [7, 8, 9])
    generated = backbone([7, 8, 9]).features
    assert [f.shape for f in features] == [f.shape for f in generated]
    assert all(torch.isfinite(f).all() for f in features)
    with pytest.raises(ValueError, match="takes no prompts"):
        backbone.invert(real, ["a face"] * 3, [7, 8, 9])
    with pytest.raises(ValueError, match="3 images for 2 seeds"):
        backbone.invert(real, None, [7, 8])
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\] uint8"):
        backbone.invert(real.astype(np.float32), None, [7, 8, 9])


def test_invert_warns_for_an_image_its_projection_cannot_redraw(backbone, caplog):
    real, _ = toyworld.arrays([1_000_000, 1_000_001], 32)
    noise = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    with caplog.at_level("INFO", logger="factory.backbones.gan"):
        backbone.invert(np.concatenate([real, noise]), None, [7, 8, 9])
    poor = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(poor) == 1 and poor[0].startswith("image 2 is redrawn poorly by its projection (PSNR")
    assert any(r.getMessage().startswith("projected 3 images into W+: PSNR") for r in caplog.records)


@pytest.mark.parametrize(("override", "named"), [("backbone.inversion_steps=0", "backbone.inversion_steps"),
                                                 ("backbone.inversion_lr=0", "backbone.inversion_lr")])
def test_bad_inversion_settings_are_refused_by_name(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


def test_readme_walk_labels_real_photos_with_a_published_interpreter(tmp_path):
    """The README's snippet: a decoder published as `factory train` publishes it labels real images
    through `backbone.invert`."""
    from conftest import save_untrained_decoder
    from PIL import Image

    from factory.data.images import square, to_rgb
    from factory.decoders.files import load_decoder

    real, _ = toyworld.arrays([1_000_000, 1_000_001], 32)
    files = [tmp_path / "0.png", tmp_path / "1.png"]
    Image.fromarray(real[0]).resize((48, 64)).save(files[0])  # another size and shape: cropped to the backbone's
    grey16 = np.asarray(Image.fromarray(real[1]).convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey16).save(files[1])  # 16-bit grey: scaled to 8 bits, not clipped white
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      [f"workdir={tmp_path}", "backbone.inversion_steps=5"])
    save_untrained_decoder(cfg)
    backbone, decoder = load_backbone(cfg.backbone), load_decoder(cfg.generate.decoder)
    photos = np.stack([np.asarray(square(to_rgb(Image.open(f)), backbone.resolution, Image.BICUBIC)) for f in files])
    assert photos.shape == (2, 32, 32, 3) and photos[1].mean() < 200  # the README's reading, not a white square
    features = backbone.invert(photos, None, seeds=[0, 1])
    masks = decoder(features, photos.shape[1:3]).masks
    assert masks.shape == (2, 32, 32) and int(masks.max()) < len(cfg.label_names())
