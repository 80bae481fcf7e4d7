"""`factory demo`: the whole DatasetGAN slice on the embedded default, start to finish.

export -> (stand-in annotator) -> import -> train on Ray Train -> generate on Ray Data -> inspect

The built-in backbone is a tiny StyleGAN2 with seeded random weights, so its images are smooth
colour fields rather than objects. A stand-in annotator labels the exported images by a fixed rule
(the dominant colour of each pixel; low-saturation pixels are background), which the decoder must
learn from the backbone's features. Swapping in trained weights is one value: `backbone.weights`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from factory import annotate, inspect, labels
from factory.config import FactoryConfig, load_config
from factory.generate import generate
from factory.runtime import init_ray
from factory.train import train

log = logging.getLogger(__name__)

def color_annotator(image: np.ndarray) -> np.ndarray:
    """The demo's stand-in for a person: class 1 where the blue channel is above mid-grey."""
    return (image[..., 2] > 127).astype(np.uint8)


def annotate_by_rule(directory: str) -> None:
    """Label every exported image with `color_annotator`, as an annotator would: masks/<name>.png."""
    export = labels.read_export(directory)
    masks = {}
    for entry in export["images"]:
        with Image.open(os.path.join(directory, labels.IMAGES_DIR, entry["file"])) as im:
            masks[entry["file"]] = color_annotator(np.array(im.convert("RGB")))
    annotate.write_masks(directory, masks)


DEMO_SETTINGS = ("generate.shard_size=250", "generate.calibration_samples=250")
"""Where the demo departs from the defaults (as configs/demo.yaml does): 1,000 seeds in 4 shards."""


def demo_config(workdir: str, overrides: list[str] | tuple[str, ...] = ()) -> FactoryConfig:
    return load_config(None, [f"workdir={workdir}", *DEMO_SETTINGS, *overrides])


def run_demo(cfg: FactoryConfig) -> dict:
    """Run every stage; returns the dataset summary (also printed by the CLI)."""
    init_ray(cfg.ray)
    # 1. Export generated images for labeling.
    annotate.export_images(cfg)
    # 2. The stand-in annotator labels them.
    annotate_by_rule(cfg.annotate.dir)
    # 3. Import and validate the labels.
    annotate.import_labels(cfg)
    # 4. Fit the Style Interpreter on Ray Train.
    metrics = train(cfg)
    # 5. Generate the labeled dataset on Ray Data.
    generate(cfg)
    # 6. Inspect it.
    summary = inspect.summarize(cfg.generate.output)
    summary["preview"] = inspect.preview(cfg.generate.output, os.path.join(cfg.generate.output, "preview.png"))
    summary["train_metrics"] = metrics
    return summary
