"""A toy world with ground truth: seeded procedural scenes of shapes on a textured floor.

Each scene is a function of its seed: a floor plane receding into the distance (depth grows toward
the top of the image), with 1-4 objects (discs, boxes, rings) of class-typical colours standing on it
at random depths, nearer objects drawn over farther ones. Ground truth for every image: the class of
every pixel, instance ids, and a depth map in metres.

It stands in for a folder of real labeled photos where no dataset can be downloaded: `write_folder`
writes exactly the layout `factory labels import` reads (images/, masks/, depth/, instances.json,
prompts.jsonl).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

CLASSES = ["background", "disc", "box", "ring"]
"""Pixel class ids are indices into this list."""

_HUES = {"disc": (0.95, 0.25, 0.2), "box": (0.2, 0.45, 0.95), "ring": (0.95, 0.8, 0.15)}
_COLOUR_WORDS = {"disc": "red", "box": "blue", "ring": "yellow"}


@dataclass
class Scene:
    image: np.ndarray
    """[H, W, 3] uint8."""
    mask: np.ndarray
    """[H, W] uint8 class ids (CLASSES)."""
    instances: np.ndarray
    """[H, W] int32: 0 floor, i for the i-th object (in `classes` order)."""
    classes: list[int]
    """Class id of each instance."""
    depth: np.ndarray
    """[H, W] float32 metres."""
    prompt: str


def render(seed: int, size: int = 64) -> Scene:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = rng.uniform(0.15, 0.35)
    depth = np.where(yy > horizon, 1.5 + 8.0 * (1 - yy) ** 2, 12.0).astype(np.float32)
    floor = rng.uniform(0.3, 0.6, 3) * (0.75 + 0.25 * yy[..., None])
    texture = rng.normal(0, 0.04, (size // 4, size // 4, 1)).repeat(4, 0).repeat(4, 1)
    image = np.clip(floor + texture + np.where(yy[..., None] < horizon, 0.2, 0.0), 0, 1)
    mask = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    objects = []
    for _ in range(rng.integers(1, 5)):
        name = CLASSES[int(rng.integers(1, len(CLASSES)))]
        cy = rng.uniform(horizon + 0.1, 0.9)
        objects.append((name, cy, rng.uniform(0.15, 0.85), rng.uniform(0.08, 0.16) * (0.6 + cy)))
    objects.sort(key=lambda o: o[1])  # farther (higher up) first; nearer objects occlude them
    classes: list[int] = []
    for name, cy, cx, r in objects:
        dx, dy = xx - cx, yy - cy
        if name == "disc":
            region = dx**2 + dy**2 < r**2
        elif name == "box":
            region = (np.abs(dx) < r) & (np.abs(dy) < r * rng.uniform(0.6, 1.0))
        else:
            d2 = dx**2 + dy**2
            region = (d2 < r**2) & (d2 > (0.55 * r) ** 2)
        if not region.any():
            continue
        colour = np.clip(np.asarray(_HUES[name]) + rng.normal(0, 0.07, 3), 0, 1)
        shade = 0.8 + 0.2 * (1 - dy / (2 * r))  # lit from above
        image = np.where(region[..., None], np.clip(colour * shade[..., None], 0, 1), image)
        classes.append(CLASSES.index(name))
        mask[region] = classes[-1]
        instances[region] = len(classes)
        depth[region] = 1.5 + 8.0 * (1 - min(cy + r, 1.0)) ** 2
    present = [c for c in CLASSES[1:] if CLASSES.index(c) in classes]
    prompt = "a photo of " + " and ".join(f"a {_COLOUR_WORDS[c]} {c}" for c in present) if present else "a photo"
    return Scene((image * 255).round().astype(np.uint8), mask, instances, classes, depth, prompt)


def write_folder(directory: str, num_images: int, start_seed: int = 0, size: int = 64, depth_scale: float = 1000.0) -> str:
    """Render scenes start_seed .. start_seed + num_images - 1 as a labeled folder."""
    from pycocotools import mask as mask_utils

    for sub in ("images", "masks", "depth"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i, "name": c} for i, c in enumerate(CLASSES) if i]}
    prompts = []
    for n, seed in enumerate(range(start_seed, start_seed + num_images)):
        scene = render(seed, size)
        name = f"scene-{seed:06d}.png"
        Image.fromarray(scene.image).save(os.path.join(directory, "images", name))
        Image.fromarray(scene.mask).save(os.path.join(directory, "masks", name))
        depth = np.clip(np.round(scene.depth * depth_scale), 0, 65535).astype(np.uint16)
        Image.fromarray(depth).save(os.path.join(directory, "depth", name))
        coco["images"].append({"id": n + 1, "file_name": name, "width": size, "height": size})
        for i, class_id in enumerate(scene.classes, 1):
            region = np.asfortranarray((scene.instances == i).astype(np.uint8))
            if not region.any():
                continue  # fully occluded
            rle = mask_utils.encode(region)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": n + 1, "category_id": class_id,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "area": int(region.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
        prompts.append({"file": name, "prompt": scene.prompt})
    with open(os.path.join(directory, "instances.json"), "w") as f:
        json.dump(coco, f)
    with open(os.path.join(directory, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    return directory
