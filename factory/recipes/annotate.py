"""The annotation round trip: export generated images for people to label, import their labels.

The export folder opens in any labeling tool: plain PNGs under `images/`, the label names in
`classes.txt`, instructions in `README.txt`. `export.json` records the seed, latent, class and pixel
hash of every image, the batches they were generated in, and the backbone's hash, so import (and
training) can prove that regenerating an image from its seed (or from the user's own latent,
`annotate.latents`), in its batch, gives back exactly the pixels that were labeled.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from factory import fingerprint, storage
from factory.backbones import backbone_identity, load_backbone
from factory.backbones.stylegan2 import num_ws
from factory.config import ConfigError, FactoryConfig
from factory.data import annotations

log = logging.getLogger(__name__)

_README = """\
Label these images for the factory ({task}).

images/       the generated images; do not rename them
classes.txt   the label names; the line number (from 0) is the label id
export.json   seed, latent, class and pixel hash of every image (do not edit)

Segmentation: for each image, save an index mask with the same file name under masks/
  (single-channel PNG, mode L or P, same size as the image, pixel value = class id),
  or export COCO JSON as coco.json here (category names must match classes.txt).
Keypoints: export COCO JSON as coco.json here, keypoints in the order of classes.txt.
Images you cannot label: list their file names in skip.txt, one per line.
Then run: factory annotate import CONFIG
"""


def user_latents(cfg: FactoryConfig, backbone) -> torch.Tensor | None:
    """`annotate.latents` checked against the generator's z or w size, or None (images from seeds)."""
    a = cfg.annotate
    if a.latents is None:
        return None
    if cfg.backbone.kind != "stylegan2":
        raise ConfigError("annotate.latents needs backbone.kind 'stylegan2' (it renders a GAN's z or w)")
    arch = backbone.generator.cfg
    dim = arch.z_dim if a.latent_space == "z" else arch.w_dim
    return torch.from_numpy(annotations.read_latents(a.latents, a.latent_space, dim, num_ws(arch)))


def export_images(cfg: FactoryConfig) -> str:
    """Generate `annotate.num_images` images from consecutive seeds (or one image per row of the
    user's `annotate.latents`) into `annotate.dir`."""
    out = cfg.annotate.dir
    check_folder("annotate.dir", out)
    backbone = load_backbone(cfg.backbone)
    given = user_latents(cfg, backbone)
    count = cfg.annotate.num_images if given is None else len(given)
    seeds = list(range(cfg.annotate.start_seed, cfg.annotate.start_seed + count))
    records, batches = render(cfg, backbone, seeds, given)
    record = {
        "backbone_hash": backbone.weights_hash,
        "psi": cfg.backbone.psi,
        "resolution": backbone.resolution,
        "task": cfg.decoder.task,
        "labels": cfg.label_names(),
        "batches": batches,  # the forward passes the images came from: training regenerates them alike
        "latents": None if given is None else {
            "file": os.path.basename(cfg.annotate.latents), "space": cfg.annotate.latent_space,
            "sha256": fingerprint.file_sha256(cfg.annotate.latents)},
        "images": records,
    }
    write_export(cfg, record)
    log.info("exported %d images to %s", len(records), out)
    return out


def render(cfg: FactoryConfig, backbone, seeds: list[int], given: torch.Tensor | None = None
           ) -> tuple[list[dict], list[list[int]]]:
    """Render `seeds` (or the user's latents `given`, one per seed) in batches of `annotate.batch_size`
    into annotate.dir/images/; returns their export records and the batches."""
    out = cfg.annotate.dir
    os.makedirs(os.path.join(out, annotations.IMAGES_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, annotations.MASKS_DIR), exist_ok=True)
    records = []
    size = cfg.annotate.batch_size
    batches = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    for start in range(0, len(seeds), size):
        batch_seeds = seeds[start : start + size]
        if given is None:
            batch = backbone(batch_seeds)
        else:
            batch = backbone.render(given[start : start + size], cfg.annotate.latent_space, batch_seeds)
        classes = batch.classes or [None] * len(batch_seeds)
        for seed, image, latent, klass in zip(batch_seeds, batch.images.numpy(), batch.latents, classes):
            name = f"{seed:08d}.png"
            Image.fromarray(image).save(os.path.join(out, annotations.IMAGES_DIR, name))
            records.append({"file": name, "seed": seed, "latent": latent.tolist(), "class": klass,
                            "sha256": annotations.pixels_sha256(image)})
    return records, batches


def write_export(cfg: FactoryConfig, record: dict) -> None:
    """export.json (replaced in one step), classes.txt and README.txt in annotate.dir."""
    out = cfg.annotate.dir
    tmp = os.path.join(out, f".{annotations.EXPORT_RECORD}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(out, annotations.EXPORT_RECORD))
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(cfg.label_names()) + "\n")
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(_README.format(task=cfg.decoder.task))


def add_to_export(cfg: FactoryConfig, seeds: list[int]) -> list[str]:
    """Render more seeds into an existing export (a later annotation round): their images join
    images/, their records and batches join export.json, so `annotate import` takes every round's
    labels together and training regenerates each image in its own batch. Returns the new files."""
    export = annotations.read_export(cfg.annotate.dir)
    backbone = load_backbone(cfg.backbone)
    if export["backbone_hash"] != backbone.weights_hash:
        raise annotations.AnnotationError([
            f"{annotations.EXPORT_RECORD}: exported with backbone {export['backbone_hash'][:12]}, the config's "
            f"backbone is {backbone.weights_hash[:12]}; a new round must use the first round's backbone"])
    if export.get("latents"):
        raise ValueError(f"{cfg.annotate.dir} was exported from your own latents ({export['latents']['file']}); "
                         "a later round renders seeds, export it into another annotate.dir")
    taken = {r["seed"] for r in export["images"]}
    clash = sorted(taken & set(seeds))
    if clash:
        raise ValueError(f"seeds {clash[:5]} are already in {cfg.annotate.dir}/{annotations.EXPORT_RECORD}")
    records, batches = render(cfg, backbone, seeds)
    export["images"] = export["images"] + records
    export["batches"] = (export.get("batches") or [[r["seed"]] for r in export["images"][: -len(records)]]) + batches
    write_export(cfg, export)
    return [r["file"] for r in records]


def import_labels(cfg: FactoryConfig) -> annotations.LabeledSet:
    """Validate the annotators' work and write `train.labeled`; raises AnnotationError listing problems."""
    if storage.is_local(cfg.train.labeled):
        check_folder("train.labeled", cfg.train.labeled, os.path.dirname(os.path.abspath(cfg.train.labeled)))
    export = annotations.read_export(cfg.annotate.dir)
    backbone = backbone_identity(cfg.backbone)
    problems = []
    if export["backbone_hash"] != backbone.weights_hash:
        problems.append(
            f"{annotations.EXPORT_RECORD}: exported with backbone {export['backbone_hash'][:12]}, but the config's "
            f"backbone is {backbone.weights_hash[:12]} (check backbone.weights / backbone.init_seed)"
        )
    if export["psi"] != cfg.backbone.psi:
        problems.append(f"{annotations.EXPORT_RECORD}: exported with psi={export['psi']}, config has backbone.psi={cfg.backbone.psi}")
    if export["labels"] != cfg.label_names():
        problems.append(f"{annotations.EXPORT_RECORD}: exported for labels {export['labels']}, config has {cfg.label_names()}")
    if problems:
        raise annotations.AnnotationError(problems)
    labeled = annotations.import_annotations(cfg.annotate.dir, cfg.decoder.task, cfg.label_names())
    storage.write_file(cfg.train.labeled, lambda path: annotations.save_labeled_set(path, labeled))
    log.info("imported %d labeled images into %s", len(labeled.files), cfg.train.labeled)
    return labeled


def check_folder(key: str, value: str, folder: str | None = None) -> None:
    """A folder can be made at `folder` (default: `value`, the setting `key`): no file stands where it
    or a folder above it goes. ConfigError naming the key and the file in the way."""
    here = os.path.abspath(value if folder is None else folder)
    while not os.path.exists(here) and os.path.dirname(here) != here:
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise ConfigError(f"{key}={value}: {here} is a file, in the way of a folder this writes")


def write_masks(directory: str, masks: dict[str, np.ndarray]) -> None:
    """Save index masks the way an annotator would (used by the demo's stand-in annotator and tests)."""
    os.makedirs(os.path.join(directory, annotations.MASKS_DIR), exist_ok=True)
    for name, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8)).save(os.path.join(directory, annotations.MASKS_DIR, name))
