"""`factory demo`: a whole path on the shipped toy backbones, start to finish.

The backbones were trained by the project's own `factory pretrain` on toy-world faces
(`factory/data/toyworld.py`; configs/toy_gan.yaml, configs/toy_dm.yaml), so the demo's images are
recognisable scenes and its labels can be checked against a ground truth.

GAN path (`factory demo`, DatasetGAN):
    export 16 generated faces -> the stand-in annotator labels them -> import -> fit the Style
    Interpreter on Ray Train -> generate on Ray Data -> inspect
  DatasetGAN's annotated images are generated ones, labeled by a person; here a segmenter trained on
  toy-world ground truth (`factory/toy/annotator.py`) stands in for the person, for those 16 only.

Diffusion path (`factory demo --diffusion`, DatasetDM):
    16 toy-world faces with their ground truth (part masks, depth) -> import -> fit the perception
    decoder on their inverted features on Ray Train -> generate from template prompts on Ray Data
    -> inspect
"""

from __future__ import annotations

import logging
import os

from factory.config import FactoryConfig, load_config
from factory.data import labeled_photos, toyworld
from factory.recipes import annotate, inspect
from factory.recipes.generate import generate
from factory.recipes.train import train
from factory.runtime import init_ray
from factory.toy.annotator import annotate_with_segmenter

log = logging.getLogger(__name__)

_CLASSES = "[" + ",".join(toyworld.CLASSES) + "]"

GAN_SETTINGS = (
    "backbone.kind=stylegan2", "backbone.weights=pkg://toy_stylegan2.safetensors", "backbone.psi=0.7",
    "backbone.stylegan2.channel_max=64", "backbone.feature_resolutions=[16,32]",
    f"labels.classes={_CLASSES}", "decoder.num_heads=10", "train.steps=1200", "train.val_images=0",
    "generate.num_samples=1000", "generate.shard_size=250", "generate.calibration_samples=250",
)
"""Where the GAN demo departs from the built-in defaults (configs/demo.yaml spells the result out)."""

DM_SETTINGS = (
    "name=demo-dm", "backbone.kind=diffusion", "backbone.weights=pkg://toy_diffusion",
    "backbone.diffusion.resolution=32", "backbone.diffusion.guidance_scale=3.0", "backbone.batch_invariant=false",
    "backbone.diffusion.image_features=true",
    "decoder.kind=perception", "decoder.tasks=[segmentation,depth]", "decoder.num_heads=5", "decoder.dim=128",
    f"labels.classes={_CLASSES}", "labels.dir=${workdir}/labeled", "train.labeled=${workdir}/labeled.safetensors",
    "train.steps=1200", "train.val_images=4", "train.batch_images=4",
    "prompts.template=a photo of a face with {hair} hair on a {backdrop} background",
    "prompts.attributes={hair: [black, brown, blond, red, grey, blue], backdrop: [white, blue, green, yellow, red, dark]}",
    "generate.num_samples=500", "generate.shard_size=250", "generate.calibration_samples=100",
    "generate.batch_size=16",
)
"""Where the diffusion demo departs from the built-in defaults (configs/demo_dm.yaml spells it out)."""

DM_LABELED_SEEDS = range(3_000_000, 3_000_016)
"""The 16 "real" labeled faces: toy scenes the backbones never saw (they trained on seeds 0-3999)."""


def demo_config(workdir: str, overrides: list[str] | tuple[str, ...] = (), diffusion: bool = False) -> FactoryConfig:
    settings = DM_SETTINGS if diffusion else GAN_SETTINGS
    return load_config(None, [f"workdir={workdir}", *settings, *overrides])


def run_demo(cfg: FactoryConfig, command: str | None = None) -> dict:
    """Run every stage of the path `cfg.backbone.kind` names; returns the dataset summary (also
    printed by the CLI). `command` (what was run) is recorded in the dataset card."""
    init_ray(cfg.ray, training=True)
    # 1-3. Labeled examples.
    prepare_labels(cfg)
    # 4. Fit the decoder on Ray Train.
    metrics = train(cfg)
    # 5. Generate the labeled dataset on Ray Data.
    generate(cfg, command=command or "factory demo" + (" --diffusion" if cfg.backbone.kind == "diffusion" else ""))
    # 6. Inspect it.
    summary = inspect.summarize(cfg.generate.output)
    summary["preview"] = inspect.preview(cfg.generate.output, os.path.join(cfg.generate.output, "preview.png"))
    summary["train_metrics"] = metrics
    return summary


def prepare_labels(cfg: FactoryConfig) -> None:
    """The demo's labeled examples, imported into `train.labeled`."""
    if cfg.backbone.kind == "stylegan2":
        # 1. Export generated images for labeling. 2. The stand-in annotator labels them.
        # 3. Import and validate the labels.
        annotate.export_images(cfg)
        annotate_with_segmenter(cfg.annotate.dir)
        annotate.import_labels(cfg)
    else:
        # 1-3. Sixteen labeled toy faces stand in for your labeled photos; import and validate them.
        toyworld.write_folder(cfg.labels.dir, len(DM_LABELED_SEEDS), start_seed=DM_LABELED_SEEDS.start)
        labeled_photos.import_labels(cfg)
