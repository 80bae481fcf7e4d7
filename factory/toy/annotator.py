"""Stand-in annotators: the GAN-path demo's segmenter trained on toy-world ground truth, and a
colour rule for the tests' random-weight backbones.

DatasetGAN's 16 annotated images are *generated* ones, labeled by a person. No person is at hand in
`factory demo`, so a small segmenter (`factory.toy.segmenter`) trained on plentiful toy-world scenes
(rendered and resized exactly as the shipped StyleGAN2's training images were) labels the exported
generated images instead. It is used only for that: never to score anything (`benchmarks/quality.py`
scores against the toy world's own ground truth).

The shipped copy (factory/weights/toy_annotator.safetensors, with its record beside it) was made by

    python jobs/train_annotator.py factory-work-toy/toy_annotator.safetensors
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from factory import __version__
from factory.config import SHIPPED_DIR
from factory.data import annotations, toyworld
from factory.recipes import annotate
from factory.toy import segmenter

SHIPPED_ANNOTATOR = os.path.join(SHIPPED_DIR, "toy_annotator.safetensors")
TRAIN_SEEDS = range(2_000_000, 2_006_000)
"""Disjoint from the backbones' training scenes (0-3999) and the quality benchmark's (1,000,000 on)."""


def train_annotator(out: str, resolution: int = 32, seeds: range = TRAIN_SEEDS,
                    cfg: segmenter.SegmenterConfig | None = None,
                    fit_cfg: segmenter.FitConfig = segmenter.FitConfig(steps=2000, batch_size=32, lr=2e-3),
                    progress: bool = True) -> dict:
    """Fit the annotator on toy scenes `seeds` at `resolution`, save it to `out` and a JSON record of
    how beside it (<out stem>.json: seeds, configs, held-out mIoU, versions); returns the record."""
    started = time.perf_counter()
    cfg = cfg or segmenter.SegmenterConfig(len(toyworld.CLASSES), width=24, levels=3)
    images, masks = toyworld.arrays(seeds, resolution)
    model = segmenter.fit(images, masks, cfg, fit_cfg, progress=progress)
    held_images, held_masks = toyworld.arrays(range(seeds.stop, seeds.stop + 500), resolution)
    per_class = segmenter.iou_per_class(segmenter.predict(model, held_images), held_masks, cfg.num_classes)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    segmenter.save(model, out, toyworld.CLASSES)
    record = {
        "command": f"python jobs/train_annotator.py {out}", "resolution": resolution,
        "seeds": [seeds.start, seeds.stop], "segmenter": asdict(cfg), "fit": asdict(fit_cfg),
        "held_out": {"seeds": [seeds.stop, seeds.stop + 500], "miou": segmenter.mean_iou(per_class),
                     "iou": dict(zip(toyworld.CLASSES, per_class))},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": {"factory": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=2)
    return record


def color_annotator(image: np.ndarray) -> np.ndarray:
    """A rule for random-weight backbones, whose images are colour fields (the tests' stand-in
    annotator; classes background, blue): class 1 where the blue channel is above mid-grey."""
    return (image[..., 2] > 127).astype(np.uint8)


def annotate_by_rule(directory: str) -> None:
    """Label every exported image in `directory` with `color_annotator`: masks/<name>.png."""
    _annotate(directory, lambda images: np.stack([color_annotator(im) for im in images]))


def annotate_with_segmenter(directory: str, weights: str = SHIPPED_ANNOTATOR) -> None:
    """Label every exported image in `directory` with the segmenter at `weights`, as an annotator
    would: masks/<name>.png."""
    model, _ = segmenter.load(weights)
    _annotate(directory, lambda images: segmenter.predict(model, images))


def _annotate(directory: str, label) -> None:
    export = annotations.read_export(directory)
    names = [entry["file"] for entry in export["images"]]
    images = []
    for name in names:
        with Image.open(os.path.join(directory, annotations.IMAGES_DIR, name)) as im:
            images.append(np.array(im.convert("RGB")))
    annotate.write_masks(directory, dict(zip(names, label(np.stack(images)))))
