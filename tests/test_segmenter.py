"""The small segmentation network: it learns toy-world masks, IoU and chance are right, save/load."""

import numpy as np
import pytest
import torch

from factory.data import toyworld
from factory.toy import segmenter


def scenes(seeds):
    rendered = [toyworld.render(s) for s in seeds]
    return np.stack([s.image for s in rendered]), np.stack([s.mask for s in rendered])


def test_iou_and_chance_by_hand():
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    assert segmenter.iou_per_class(pred, truth, 3) == [0.5, 2 / 3, None]
    assert segmenter.mean_iou([0.5, None, 1.0]) == 0.75
    assert segmenter.chance_iou(truth, 3) == [pytest.approx(0.5 / 1.5), pytest.approx(0.5 / 1.5), None]


def test_learns_toy_masks_well_above_chance_and_round_trips(tmp_path):
    num_classes = len(toyworld.CLASSES)
    images, masks = scenes(range(200))
    test_images, test_masks = scenes(range(10_000, 10_060))
    cfg = segmenter.SegmenterConfig(num_classes, width=16, levels=2)
    model = segmenter.fit(images, masks, cfg, segmenter.FitConfig(steps=150, batch_size=16, lr=3e-3))
    pred = segmenter.predict(model, test_images)
    miou = segmenter.mean_iou(segmenter.iou_per_class(pred, test_masks, num_classes))
    chance = segmenter.mean_iou(segmenter.chance_iou(test_masks, num_classes))
    assert miou > 2.5 * chance, (miou, chance)  # faces: 8 classes, most of them small parts
    path = str(tmp_path / "seg.safetensors")
    segmenter.save(model, path, toyworld.CLASSES)
    loaded, classes = segmenter.load(path)
    assert classes == toyworld.CLASSES
    np.testing.assert_array_equal(segmenter.predict(loaded, test_images[:4]), pred[:4])
    again = segmenter.fit(images[:32], masks[:32], cfg, segmenter.FitConfig(steps=3, batch_size=8))
    same = segmenter.fit(images[:32], masks[:32], cfg, segmenter.FitConfig(steps=3, batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), same.state_dict().values()))


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="width a multiple of 8"):
        segmenter.SegmenterConfig(4, width=12)
    images, masks = scenes(range(2))
    with pytest.raises(ValueError, match="mask value 3 >= num_classes=2"):
        segmenter.fit(images, np.full_like(masks, 3), segmenter.SegmenterConfig(2), segmenter.FitConfig(steps=1))
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, 3\]"):
        segmenter.fit(images[..., 0], masks, segmenter.SegmenterConfig(4), segmenter.FitConfig(steps=1))
    (tmp_path / "x.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="is not a factory segmenter"):
        segmenter.load(str(tmp_path / "x.safetensors"))


def test_fit_selected_keeps_the_best_validation_step_and_never_trains_on_validation():
    num_classes = len(toyworld.CLASSES)
    images, masks = scenes(range(64))
    val_images, val_masks = scenes(range(20_000, 20_024))
    cfg = segmenter.SegmenterConfig(num_classes, width=16, levels=2)
    fit_cfg = segmenter.FitConfig(steps=40, batch_size=16, lr=3e-3)
    model, selected = segmenter.fit_selected(images, masks, val_images, val_masks, cfg, fit_cfg, every=15)
    assert [step for step, _ in selected["curve"]] == [15, 30, 40]  # and the last step
    best = max(selected["curve"], key=lambda p: p[1])
    assert selected["step"] == best[0] and selected["val_miou"] == best[1]
    again = segmenter.mean_iou(segmenter.iou_per_class(segmenter.predict(model, val_images), val_masks, num_classes))
    assert again == pytest.approx(selected["val_miou"])  # the returned model is the selected state
    last = segmenter.fit(images, masks, cfg, fit_cfg)  # the same run to the end, without selection
    ref = dict(selected["curve"])[40]
    got = segmenter.mean_iou(segmenter.iou_per_class(segmenter.predict(last, val_images), val_masks, num_classes))
    assert got == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ValueError, match="every must be >= 1"):
        segmenter.fit_selected(images, masks, val_images, val_masks, cfg, fit_cfg, every=0)


def test_embed_is_a_fixed_feature_per_image():
    cfg = segmenter.SegmenterConfig(len(toyworld.CLASSES), width=16, levels=2)
    model = segmenter.Segmenter(cfg).eval()
    images, _ = scenes(range(5))
    feats = segmenter.embed(model, images, batch_size=2)
    assert feats.shape == (5, 16 + 32 + 64)
    np.testing.assert_allclose(segmenter.embed(model, images[3:4]), feats[3:4], rtol=1e-5, atol=1e-6)
