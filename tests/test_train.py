"""Training stages without Ray: pixel sampling, determinism, and that the interpreter learns."""

import pytest
import torch

from factory.config import load_config
from factory.data.annotations import load_labeled_set
from factory.recipes import annotate
from factory.recipes.objectives import PixelSampler, segmentation_metrics
from factory.recipes.ray_train import step_generator
from factory.recipes.train import fit, learning_rate
from factory.toy.annotator import annotate_by_rule


def test_balanced_sampling_visits_rare_classes_as_often():
    region = torch.zeros(2, 10, 10, dtype=torch.long)
    region[0, 0, 0] = 2  # one pixel of class 2
    region[1, :5] = 1
    sampler = PixelSampler(region, [0, 1], balanced=True)
    image, ys, xs = sampler(3000, torch.Generator().manual_seed(0))
    counts = torch.bincount(region[image, ys, xs], minlength=3).float() / 3000
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04)
    uniform = PixelSampler(region, [0, 1], balanced=False)
    image, ys, xs = uniform(3000, torch.Generator().manual_seed(0))
    assert (region[image, ys, xs] == 2).float().mean() < 0.01


def test_sampling_only_touches_training_images():
    region = torch.zeros(4, 6, 6, dtype=torch.long)
    image, _, _ = PixelSampler(region, [1, 3], balanced=True)(500, torch.Generator().manual_seed(1))
    assert set(image.tolist()) == {1, 3}


def test_step_pixels_are_a_function_of_seed_rank_step():
    a = torch.rand(4, generator=step_generator(0, 1, 17))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 1, 17)))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 0, 17)))


def test_cosine_schedule_decays_to_zero_and_constant_stays():
    t = load_config(None, ["train.steps=100", "train.lr=0.002"]).train
    assert t.lr_schedule == "cosine"
    assert learning_rate(t, 0) == pytest.approx(0.002)
    assert learning_rate(t, 50) == pytest.approx(0.001)
    assert learning_rate(t, 99) < 2e-6 and learning_rate(t, 100) == pytest.approx(0.0)
    flat = load_config(None, ["train.lr_schedule=constant"]).train
    assert learning_rate(flat, 0) == learning_rate(flat, flat.steps - 1) == flat.lr
    from factory.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config(None, ["train.lr_schedule=linear"])


def test_segmentation_metrics_by_hand():
    truth = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    m = segmentation_metrics(pred, truth, 3)
    assert m["val_pixel_accuracy"] == pytest.approx(0.75)
    assert m["val_miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 2 absent: not counted


@pytest.mark.slow
def test_interpreter_learns_the_annotators_rule(tmp_path):
    """16 labeled tiny-backbone samples whose labels are a fixed function of the image (the demo's
    stand-in annotator): mIoU >= 0.9 on 16 more, held-out, generated images."""
    cfg = load_config(None, [f"workdir={tmp_path}", "annotate.num_images=32", "train.val_images=16",
                             "train.steps=400", "train.checkpoint_every=400"])
    annotate.export_images(cfg)
    annotate_by_rule(cfg.annotate.dir)
    annotate.import_labels(cfg)
    reports = []
    model, metrics = fit(cfg, load_labeled_set(cfg.train.labeled), torch.device("cpu"),
                         report=lambda m, *_: reports.append(m))
    assert [r["step"] for r in reports] == [400]
    assert metrics["val_miou"] >= 0.9, metrics
    assert not torch.equal(model.feature_std, torch.ones_like(model.feature_std))  # decoder.standardize


def test_standardize_false_feeds_raw_features(tmp_path):
    """decoder.standardize=false: the interpreter's input statistics stay the identity; true (the
    default): they are the training images' (`feature_stats`), fixed before the first step."""
    from factory.backbones import load_backbone
    from factory.decoders.interpreter import feature_stats
    from factory.recipes.objectives import InterpreterObjective

    cfg = load_config(None, [f"workdir={tmp_path}", "annotate.num_images=8", "train.val_images=2"])
    annotate.export_images(cfg)
    annotate_by_rule(cfg.annotate.dir)
    annotate.import_labels(cfg)
    backbone = load_backbone(cfg.backbone)
    objective = InterpreterObjective(cfg, load_labeled_set(cfg.train.labeled), backbone, torch.device("cpu"))
    model = objective.build(backbone.feature_channels)
    mean, std = feature_stats(objective.data.features, objective.data.train_index)
    assert objective.data.train_index == list(range(6))
    torch.testing.assert_close(model.feature_mean, mean)
    torch.testing.assert_close(model.feature_std, std)
    raw = load_config(None, [f"workdir={tmp_path}", "annotate.num_images=8", "train.val_images=2", "decoder.standardize=false"])
    model = InterpreterObjective(raw, load_labeled_set(raw.train.labeled), backbone, torch.device("cpu")).build(
        backbone.feature_channels)
    assert model.feature_mean.eq(0).all() and model.feature_std.eq(1).all()


def test_prior_correction_shifts_the_logits_by_the_training_labels_prior(tmp_path):
    """With class-balanced pixel draws (the default) and decoder.prior_correction > 0, the
    interpreter's inference logits are shifted by it x the log class prior of the *training* images'
    labels (not the validation images'), fixed before the first step; 0 (the default), or
    train.class_balanced=false (the heads then learn the prior themselves), leaves them unshifted."""
    from factory.backbones import load_backbone
    from factory.decoders.interpreter import prior_offset
    from factory.recipes.objectives import InterpreterObjective

    settings = [f"workdir={tmp_path}", "annotate.num_images=8", "train.val_images=2"]
    cfg = load_config(None, [*settings, "decoder.prior_correction=0.5"])
    annotate.export_images(cfg)
    annotate_by_rule(cfg.annotate.dir)
    annotate.import_labels(cfg)
    backbone, labeled = load_backbone(cfg.backbone), load_labeled_set(cfg.train.labeled)
    model = InterpreterObjective(cfg, labeled, backbone, torch.device("cpu")).build(backbone.feature_channels)
    counts = torch.bincount(labeled.masks[:6].flatten().long(), minlength=2)
    assert counts.min() > 0
    torch.testing.assert_close(model.logit_offset, prior_offset(counts, 0.5))
    assert model.logit_offset[counts.argmin()] < model.logit_offset[counts.argmax()]
    for extra in ([], ["train.class_balanced=false", "decoder.prior_correction=0.5"]):
        off = load_config(None, [*settings, *extra])
        model = InterpreterObjective(off, labeled, backbone, torch.device("cpu")).build(backbone.feature_channels)
        assert model.logit_offset.eq(0).all(), extra


def _coco_keypoints(directory, names, rule):
    """COCO keypoints JSON for exported images, one annotation per image, keypoints from `rule`."""
    import json
    import os

    import numpy as np
    from PIL import Image

    images, anns = [], []
    for i, name in enumerate(names):
        with Image.open(os.path.join(directory, "images", name)) as im:
            pixels = np.array(im)
        points = rule(pixels)
        images.append({"id": i, "file_name": name, "width": 32, "height": 32})
        anns.append({"id": i + 1, "image_id": i, "category_id": 1, "num_keypoints": len(points),
                     "keypoints": [v for x, y in points for v in (x, y, 2)], "bbox": [0, 0, 32, 32],
                     "area": 1024, "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "scene", "keypoints": ["bluest", "reddest"]}]}
    with open(os.path.join(directory, "coco.json"), "w") as f:
        json.dump(coco, f)


def _extreme_points(pixels):
    out = []
    for channel in (2, 0):
        y, x = divmod(int(pixels[..., channel].astype("int64").argmax()), pixels.shape[1])
        out.append((x, y))
    return out


@pytest.mark.slow
def test_keypoint_interpreter_learns_and_generates(tmp_path):
    """Keypoints end to end without Ray: COCO import, heatmap regression, decoded (x, y, score)."""
    import json

    from factory.backbones import load_backbone
    from factory.data.annotations import read_export
    from factory.decoders.files import load_decoder, save_decoder
    from factory.recipes.labeling import label_seeds

    cfg = load_config(None, [f"workdir={tmp_path}", "decoder.task=keypoints", "labels.keypoints=[bluest,reddest]",
                             "annotate.num_images=32", "train.val_images=16", "train.steps=400",
                             "train.checkpoint_every=400"])
    annotate.export_images(cfg)
    names = [e["file"] for e in read_export(cfg.annotate.dir)["images"]]
    _coco_keypoints(cfg.annotate.dir, names, _extreme_points)
    labeled = annotate.import_labels(cfg)
    assert labeled.keypoints.shape == (32, 2, 3)
    model, metrics = fit(cfg, load_labeled_set(cfg.train.labeled), torch.device("cpu"))
    # chance: a keypoint guessed uniformly over the image is ~13 px away on average
    truth = labeled.keypoints[16:, :, :2]
    guess = torch.rand(1000, 1, 1, 2, generator=torch.Generator().manual_seed(0)) * 31
    chance = float((guess - truth).norm(dim=-1).mean())
    assert metrics["val_keypoint_error_px"] < 0.5 * chance, (metrics, chance)

    backbone = load_backbone(cfg.backbone)
    save_decoder(cfg.generate.decoder, model, cfg.decoder, cfg.labels.keypoints, backbone.feature_channels,
                 backbone.weights_hash, "")
    [row] = label_seeds(backbone, load_decoder(cfg.generate.decoder), [5], shard=0, cfg=cfg, config_hash="h")
    assert row["mask"] is None
    points = json.loads(row["keypoints"])
    assert [p["name"] for p in points] == ["bluest", "reddest"]
    assert all(0 <= p["x"] <= 31 and 0 <= p["y"] <= 31 for p in points)


def test_regeneration_check_tolerates_float_noise_but_not_other_pixels():
    import numpy as np

    from factory.data.annotations import LabeledSet
    from factory.recipes.objectives import _within_float_noise

    exported = np.full((32, 32, 3), 100, np.uint8)
    labeled = LabeledSet("segmentation", ["a", "b"], ["x.png"], torch.tensor([0]), ["sha"], "h", 1.0,
                         images=torch.from_numpy(exported[None]))
    noisy = exported.copy()
    noisy[0, :5, 0] += 1  # another thread count's rounding: a few pixels, one grey level
    assert _within_float_noise(noisy, labeled, 0)
    changed = exported.copy()
    changed[:16] += 10  # other weights or psi
    assert not _within_float_noise(changed, labeled, 0)
    assert not _within_float_noise(noisy, LabeledSet("segmentation", ["a", "b"], ["x.png"], torch.tensor([0]),
                                                     ["sha"], "h", 1.0), 0)  # no pixels stored: exact only


def test_a_run_resumed_at_its_end_reports_no_loss_and_fewer_steps_are_refused():
    """A finished run re-run takes no step: its metrics carry no made-up loss of 0. A run asked for
    fewer steps than it has taken is refused, naming both. NaN metrics are left out of metrics.json."""
    from factory.recipes.train import finite_metrics, fit_objective

    class Objective:
        def loss(self, model, generator):
            return model(torch.ones(1, 1)).pow(2).sum()

        def evaluate(self, model):
            return {"val_score": 1.0}

    t = load_config(None, ["train.steps=5", "train.checkpoint_every=100"]).train
    _, fresh = fit_objective(t, Objective(), torch.nn.Linear(1, 1))
    assert fresh["step"] == 5 and fresh["loss"] > 0
    _, again = fit_objective(t, Objective(), torch.nn.Linear(1, 1), restore=lambda model, optimizer: 5)
    assert again == {"step": 5, "start_step": 5, "val_score": 1.0}
    with pytest.raises(ValueError, match=r"train.steps=5 is fewer than the 8 steps this run has already taken"):
        fit_objective(t, Objective(), torch.nn.Linear(1, 1), restore=lambda model, optimizer: 8)
    assert finite_metrics({"val_keypoint_error_px": float("nan"), "step": 5, "name": "x"}) == {"step": 5}


def test_a_fit_whose_loss_diverges_stops_before_its_weights_are_checkpointed():
    from factory.recipes.ray_train import TrainError
    from factory.recipes.train import fit_objective

    class Objective:
        def loss(self, model, generator):
            return model(torch.ones(1, 1)).pow(2).sum()

        def evaluate(self, model):
            return {}

    reports = []
    t = load_config(None, ["train.steps=20", "train.checkpoint_every=1", "train.lr=1e30", "train.lr_schedule=constant"]).train
    with pytest.raises(TrainError, match=r"train diverged at step [1-9]\d* \(loss (nan|inf)\): lower train.lr"):
        fit_objective(t, Objective(), torch.nn.Linear(1, 1), report=lambda m, model, o, s: reports.append(
            next(model.parameters()).detach().clone()))
    assert reports and all(torch.isfinite(w).all() for w in reports)  # no checkpoint holds the diverged weights


def test_a_labeled_set_that_does_not_fit_is_refused_before_a_cluster_starts(tiny_cfg, labeled_dir, monkeypatch, tmp_path,
                                                                           capsys):
    from factory import config as config_lib
    from factory import runtime
    from factory.cli import main

    annotate.import_labels(tiny_cfg)
    config = tmp_path / "my.yaml"
    config.write_text(config_lib.to_yaml(tiny_cfg))
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: pytest.fail("a cluster started"))
    # the config allows 8 held out of 20 to export, but the labeled set has the 8 exported: none left
    assert main(["train", str(config), "annotate.num_images=20", "train.val_images=8"]) == 2
    assert "has 8 labeled images; train.val_images=8 would leave none to train on" in capsys.readouterr().err


def test_classes_and_keypoints_no_label_shows_are_warned_about(caplog):
    from types import SimpleNamespace

    from factory.recipes.train import warn_unlabeled

    cfg = load_config(None, ["labels.classes=[background,blue,red]", "labels.keypoints=[nose,chin]"])
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    masks[0, 0, 0] = 2
    keypoints = torch.tensor([[[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]]] * 2)
    with caplog.at_level("WARNING"):
        warn_unlabeled(cfg, SimpleNamespace(masks=masks, keypoints=keypoints, files=["a.png", "b.png"]))
    assert "no labeled pixel of class blue in its 2 images" in caplog.text
    assert "keypoint chin is visible in none of its 2 images" in caplog.text and "nose" not in caplog.text
