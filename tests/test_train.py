"""Training stages without Ray: pixel sampling, determinism, and that the interpreter learns."""

import pytest
import torch

from factory import annotate
from factory.config import load_config
from factory.demo import annotate_by_rule
from factory.labels import load_labeled_set
from factory.train import PixelSampler, fit, segmentation_metrics, step_generator


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
    _, metrics = fit(cfg, load_labeled_set(cfg.train.labeled), torch.device("cpu"),
                     report=lambda m, *_: reports.append(m))
    assert [r["step"] for r in reports] == [400]
    assert metrics["val_miou"] >= 0.9, metrics
