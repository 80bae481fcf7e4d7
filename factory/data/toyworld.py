"""A toy world with ground truth: seeded procedural faces with parts, in the spirit of the papers'
face-part domains (CelebA-HQ / DatasetGAN's face classes), small enough to train a backbone on CPU.

Each scene is a function of its seed: a stylised face (head, hair, eyes, brows, nose, mouth, ears)
at a random position, scale, roll and yaw, with random skin, hair, iris, lip and background colours,
smile and eye opening, hair style (short, long, bald), a cluttered textured background, and
sometimes an occluder (a bar or a disc) in front of the face. Layers are painted back to front, so
the ground truth is exact: the part class of every pixel, one instance per part (each eye, brow and
ear its own), six keypoints with COCO visibility, and a depth map in metres (the face an ellipsoid
with a protruding nose, in front of its clutter and wall).

`render_batch` draws every scene's parameters from its own seeded generator and rasterises a whole
batch with array operations (thousands of 64 px scenes per second on one core; see
`benchmarks/toyworld.py`). `write_folder` writes the labeled-folder layout `factory labels import`
reads (images/, masks/, depth/, instances.json with instances and keypoints, prompts.jsonl).
Prompts use only words the tiny tokenizer knows whole (`tiny_diffusion.WORDS`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

CLASSES = ["background", "skin", "hair", "eye", "brow", "nose", "mouth", "ear"]
"""Pixel class ids are indices into this list."""
KEYPOINTS = ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right", "chin"]
"""Left and right as seen in the image."""
PARTS = ["skin", "hair", "left_eye", "right_eye", "left_brow", "right_brow", "nose", "mouth",
         "left_ear", "right_ear"]
"""Instance i (1-based) is PARTS[i - 1]."""
PART_CLASSES = [CLASSES.index(p.split("_")[-1]) for p in PARTS]
KEYPOINT_CLASSES = [CLASSES.index(c) for c in ("eye", "eye", "nose", "mouth", "mouth", "skin")]
"""The part each keypoint lies in (when visible)."""

_SKIN = np.array([[0.98, 0.85, 0.74], [0.94, 0.76, 0.62], [0.82, 0.62, 0.46], [0.66, 0.46, 0.32],
                  [0.48, 0.32, 0.22], [0.36, 0.24, 0.17]], np.float32)
_HAIR = {"black": (0.08, 0.07, 0.07), "brown": (0.40, 0.24, 0.12), "blond": (0.93, 0.80, 0.45),
         "red": (0.72, 0.25, 0.10), "grey": (0.62, 0.62, 0.64), "blue": (0.15, 0.30, 0.85)}
_BACKDROP = {"white": (0.92, 0.92, 0.90), "blue": (0.30, 0.50, 0.85), "green": (0.35, 0.70, 0.40),
             "yellow": (0.92, 0.82, 0.35), "red": (0.80, 0.30, 0.30), "dark": (0.18, 0.18, 0.22)}
_IRIS = np.array([[0.25, 0.15, 0.08], [0.20, 0.40, 0.70], [0.25, 0.50, 0.30], [0.10, 0.08, 0.06]], np.float32)
_HAIR_NAMES, _BACKDROP_NAMES = list(_HAIR), list(_BACKDROP)
_CLUTTER = 4


@dataclass
class Scene:
    image: np.ndarray
    """[H, W, 3] uint8."""
    mask: np.ndarray
    """[H, W] uint8 class ids (CLASSES)."""
    instances: np.ndarray
    """[H, W] int32: 0 background, i for PARTS[i - 1] (absent where fully hidden)."""
    classes: list[int]
    """Class id of each instance (PART_CLASSES)."""
    depth: np.ndarray
    """[H, W] float32 metres."""
    keypoints: np.ndarray
    """[K, 3] float32 (x, y, v): pixel-index units (pixel (i, j)'s centre is x=j, y=i, as in
    `factory.decoders.keypoints`), COCO visibility: 2 visible, 1 hidden (occluded), 0 outside."""
    prompt: str


@dataclass
class _Params:
    """Every random choice of a batch of scenes, one row per scene (struct of arrays)."""

    cx: np.ndarray
    cy: np.ndarray
    scale: np.ndarray
    roll: np.ndarray
    yaw: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    hair_name: list[str]
    hair_style: np.ndarray
    """0 short, 1 long, 2 bald."""
    hairline: np.ndarray
    backdrop: np.ndarray
    backdrop_name: list[str]
    iris: np.ndarray
    lips: np.ndarray
    smile: np.ndarray
    mouth_open: np.ndarray
    mouth_width: np.ndarray
    eye_open: np.ndarray
    gaze: np.ndarray
    brow_raise: np.ndarray
    brow_tilt: np.ndarray
    light: np.ndarray
    clutter: np.ndarray
    """[N, _CLUTTER, 8]: active, kind (0 ellipse, 1 box), cx, cy, rx, ry, then colour index, depth."""
    clutter_colour: np.ndarray
    occluder: np.ndarray
    """[N, 6]: active, kind (0 bar, 1 disc), position, angle / radius, width, depth offset."""
    occluder_colour: np.ndarray
    wall_texture: np.ndarray
    skin_texture: np.ndarray


@dataclass(frozen=True)
class WorldShift:
    """A toy world with shifted parameters, for robustness tests (`benchmarks/quality.py`'s shifted
    held-out set). Applied after every random draw, so a scene's other choices stay those of its seed
    and the identity shift renders exactly the unshifted world."""

    scale: float = 1.0
    """Multiplies the face size (drawn in 0.27-0.4 of the image height)."""
    roll: float = 1.0
    """Multiplies the head's in-plane rotation (drawn in +-0.35 rad)."""
    light: float = 1.0
    """Multiplies the light direction's offsets (drawn in +-0.6), i.e. how one-sided the shading is."""


def _draw_params(seeds: list[int], size: int, shift: WorldShift | None = None) -> _Params:
    rows = []
    coarse = max(2, size // 8)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        hair_name = _HAIR_NAMES[int(rng.integers(len(_HAIR_NAMES)))]
        backdrop_name = _BACKDROP_NAMES[int(rng.integers(len(_BACKDROP_NAMES)))]
        clutter = np.zeros((_CLUTTER, 8), np.float32)
        clutter[:, 0] = rng.random(_CLUTTER) < 0.6
        clutter[:, 1] = rng.integers(0, 2, _CLUTTER)
        clutter[:, 2:4] = rng.uniform(0.0, 1.0, (_CLUTTER, 2))
        clutter[:, 4:6] = rng.uniform(0.05, 0.25, (_CLUTTER, 2))
        clutter[:, 7] = rng.uniform(4.0, 7.0, _CLUTTER)
        occluder = np.array([rng.random() < 0.3, rng.integers(0, 2), rng.uniform(-0.8, 0.8),
                             rng.uniform(-np.pi, np.pi), rng.uniform(0.12, 0.3), rng.uniform(0.2, 0.5)], np.float32)
        rows.append(dict(
            cx=rng.uniform(0.38, 0.62), cy=rng.uniform(0.42, 0.58), scale=rng.uniform(0.27, 0.4),
            roll=rng.uniform(-0.35, 0.35), yaw=rng.uniform(-0.25, 0.25),
            skin=np.clip(_SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 0.03, 3), 0, 1),
            hair=np.clip(np.asarray(_HAIR[hair_name]) + rng.normal(0, 0.04, 3), 0, 1), hair_name=hair_name,
            hair_style=rng.choice(3, p=[0.55, 0.35, 0.10]), hairline=rng.uniform(-0.75, -0.5),
            backdrop=np.clip(np.asarray(_BACKDROP[backdrop_name]) + rng.normal(0, 0.04, 3), 0, 1),
            backdrop_name=backdrop_name,
            iris=_IRIS[rng.integers(len(_IRIS))],
            lips=np.clip(np.array([0.75, 0.25, 0.3]) + rng.normal(0, 0.07, 3), 0, 1),
            smile=rng.uniform(-0.3, 1.2), mouth_open=rng.uniform(0, 1), mouth_width=rng.uniform(0.8, 1.2),
            eye_open=rng.uniform(0.5, 1.1), gaze=rng.uniform(-0.5, 0.5, 2), brow_raise=rng.uniform(-0.05, 0.06),
            brow_tilt=rng.uniform(-0.3, 0.3), light=rng.uniform(-0.6, 0.6, 2),
            clutter=clutter, clutter_colour=rng.uniform(0.05, 0.95, (_CLUTTER, 3)),
            occluder=occluder, occluder_colour=rng.uniform(0.05, 0.95, 3),
            wall_texture=rng.normal(0, 0.05, (coarse, coarse)), skin_texture=rng.normal(0, 0.025, (coarse, coarse)),
        ))
    p = _Params(**{k: (np.asarray([r[k] for r in rows], dtype=np.float32) if not isinstance(rows[0][k], str)
                       else [r[k] for r in rows]) for k in rows[0]})
    if shift is not None and shift != WorldShift():
        p.scale, p.roll, p.light = p.scale * shift.scale, p.roll * shift.roll, p.light * shift.light
    return p


def _upsample(texture: np.ndarray, size: int) -> np.ndarray:
    """[N, c, c] -> [N, size, size], bilinear: smooth blotches."""
    c = texture.shape[1]
    pos = np.clip((np.arange(size) + 0.5) * c / size - 0.5, 0, c - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, c - 1)
    m = np.zeros((size, c), np.float32)
    m[np.arange(size), lo] += 1 - (pos - lo)
    m[np.arange(size), hi] += pos - lo
    return (m @ texture.astype(np.float32) @ m.T).astype(np.float32)


def _ellipse(u: np.ndarray, v: np.ndarray, u0, v0, ru, rv, angle=0.0) -> np.ndarray:
    """u, v [N, H, W]; the rest [N] (or scalars): inside the rotated ellipse."""
    du, dv = u - _col(u0), v - _col(v0)
    if not np.isscalar(angle):
        c, s = np.cos(_col(angle)), np.sin(_col(angle))
        du, dv = du * c + dv * s, -du * s + dv * c
    return (du / _col(ru)) ** 2 + (dv / _col(rv)) ** 2 < 1.0


def _col(x) -> np.ndarray | float:
    return x if np.isscalar(x) else np.asarray(x, np.float32)[:, None, None]


def render_batch(seeds: list[int] | range | np.ndarray, size: int = 64, shift: WorldShift | None = None) -> list[Scene]:
    """The scenes of `seeds`, each identical to `render(seed, size)`; `shift` moves the world's
    parameters (`WorldShift`).

    Layers are painted back to front as a layer index, a brightness and a depth per pixel; a layer's
    colour (per scene), class and instance are looked up from the index once at the end, so each
    layer costs three one-channel writes."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        return []
    p = _draw_params(seeds, size, shift)
    n = len(seeds)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.broadcast_to(grid[None, :, None], (n, size, size)), np.broadcast_to(grid[None, None, :], (n, size, size))
    # Face coordinates: u right, v down, the head's half-height = 1.
    cos, sin = np.cos(_col(p.roll)), np.sin(_col(p.roll))
    dx, dy = x - _col(p.cx), y - _col(p.cy)
    u = (dx * cos + dy * sin) / _col(p.scale)
    v = (-dx * sin + dy * cos) / _col(p.scale)
    yaw = p.yaw
    face_depth = 0.45 / p.scale  # nearer when bigger

    layer = np.zeros((n, size, size), np.uint8)
    shade = np.empty((n, size, size), np.float32)
    depth = np.empty((n, size, size), np.float32)
    colours: list[np.ndarray] = []  # per layer: [N, 3]
    classes: list[int] = []
    instances: list[int] = []

    def paint(region, colour, brightness, depth_value, class_id=0, instance=0):
        colours.append(np.broadcast_to(np.asarray(colour, np.float32), (n, 3)))
        classes.append(class_id)
        instances.append(instance)
        np.copyto(layer, np.uint8(len(colours) - 1), where=region)
        np.copyto(shade, brightness, where=region)
        np.copyto(depth, depth_value, where=region)

    # 1. Wall: the backdrop colour, a vertical gradient and blotchy texture, 9-11 m away.
    top_lit = 1 - y
    paint(np.ones((n, size, size), bool), p.backdrop, 0.85 + 0.25 * top_lit + _upsample(p.wall_texture, size),
          9.0 + 2.0 * y)
    # 2. Clutter: ellipses and boxes of random colours between the wall and the face (background).
    for k in range(_CLUTTER):
        c = p.clutter[:, k]
        inside = np.where(_col(c[:, 1]) > 0.5,
                          (np.abs(x - _col(c[:, 2])) < _col(c[:, 4])) & (np.abs(y - _col(c[:, 3])) < _col(c[:, 5])),
                          _ellipse(x, y, c[:, 2], c[:, 3], c[:, 4], c[:, 5]))
        paint(inside & (_col(c[:, 0]) > 0.5), p.clutter_colour[:, k], 0.8 + 0.2 * top_lit, _col(c[:, 7]))

    # Head: an ellipsoid lit from `light`; its depth bulges toward the camera.
    head_r2 = (u / 0.78) ** 2 + v**2
    bulge = np.sqrt(np.clip(1 - head_r2, 0, 1))
    lit = 0.78 + 0.22 * np.clip(bulge - _col(p.light[:, 0]) * u / 0.78 * 0.6 - _col(p.light[:, 1]) * v * 0.6, -1, 1)
    lit += _upsample(p.skin_texture, size)
    hair_texture = 0.85 + 0.15 * np.sin(u * 22.0 + 3.0 * v)
    head_depth = _col(face_depth) - 0.12 * bulge
    style = p.hair_style
    skin, hair = PART_CLASSES[0], PART_CLASSES[1]

    # 3. Ears, then long hair falling behind the head (it hides the ears), then the head.
    for i, side in ((8, -1.0), (9, 1.0)):
        ear = _ellipse(u, v, side * 0.8 + 0.4 * yaw, 0.05, 0.16, 0.26)
        paint(ear, p.skin, lit * 0.92, _col(face_depth + 0.05), PART_CLASSES[i], i + 1)
    long_hair = _ellipse(u, v, 0.0, 0.25, 1.02, 1.2) & (v > -0.2) & (_col(style) == 1)
    paint(long_hair, p.hair, hair_texture * 0.85, _col(face_depth + 0.1), hair, 2)
    paint(head_r2 < 1.0, p.skin, lit, head_depth, skin, 1)
    # 4. Hair on top: a cap above the hairline, a little larger than the head.
    hairline = _col(p.hairline) + 0.25 * u**2
    cap = _ellipse(u, v, 0.0, -0.04, 0.88, 1.08) & (v < hairline) & (_col(style) != 2)
    paint(cap, p.hair, hair_texture, head_depth - 0.02, hair, 2)

    # 5. Brows, eyes (sclera with an iris), nose, mouth (lips around a gap): all shifted by yaw.
    eye_v = -0.12
    for i, side in ((4, -1.0), (5, 1.0)):
        brow = _ellipse(u, v, side * 0.32 + yaw, -0.36 - p.brow_raise, 0.2, 0.065, side * p.brow_tilt)
        paint(brow, p.hair * 0.7, 1.0, head_depth - 0.01, PART_CLASSES[i], i + 1)
    for i, side in ((2, -1.0), (3, 1.0)):
        eu = side * 0.32 + yaw
        eye = _ellipse(u, v, eu, eye_v, 0.15, 0.085 * p.eye_open)
        paint(eye, 0.95, 1.0, head_depth, PART_CLASSES[i], i + 1)
        iris = eye & _ellipse(u, v, eu + 0.05 * p.gaze[:, 0], eye_v + 0.02 * p.gaze[:, 1], 0.065, 0.065)
        paint(iris, p.iris, 1.0, head_depth, PART_CLASSES[i], i + 1)
    nose_u = 1.3 * yaw
    nose = _ellipse(u, v, nose_u, 0.14, 0.1, 0.2)
    paint(nose, p.skin, lit * 0.85, head_depth - 0.06 * np.sqrt(np.clip(1 - ((u - _col(nose_u)) / 0.1) ** 2, 0, 1)),
          PART_CLASSES[6], 7)
    mouth_u, mouth_v = 1.1 * yaw, 0.55
    width = 0.28 * p.mouth_width
    curve = v - _col(p.smile) * 0.6 * (u - _col(mouth_u)) ** 2
    mouth = _ellipse(u, curve, mouth_u, mouth_v, width, 0.06 + 0.07 * p.mouth_open)
    paint(mouth, p.lips, 1.0, head_depth, PART_CLASSES[7], 8)
    paint(mouth & (np.abs(curve - mouth_v) < _col(0.05 * p.mouth_open)), 0.15, 1.0, head_depth, PART_CLASSES[7], 8)

    # 6. An occluder in front of the face (background): a bar through the face or a disc beside it.
    o = p.occluder
    ou, ov = _col(o[:, 2]), _col(o[:, 2] * 0.5)
    along = (u - ou) * np.cos(_col(o[:, 3])) + (v - ov) * np.sin(_col(o[:, 3]))
    bar = np.abs(along) < _col(o[:, 4])
    disc = (u - ou * 1.2) ** 2 + (v - 0.6) ** 2 < _col(o[:, 4] * 1.6) ** 2
    occluder = np.where(_col(o[:, 1]) > 0.5, disc, bar) & (_col(o[:, 0]) > 0.5)
    paint(occluder, p.occluder_colour, 0.85 + 0.15 * top_lit, _col(face_depth - o[:, 5]))

    # Compose: each pixel's layer colour x its brightness; classes and instances by layer.
    table = np.stack(colours, 1)  # [N, L, 3]
    image = table[np.arange(n)[:, None, None], layer] * shade[..., None]
    image8 = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    mask = np.asarray(classes, np.uint8)[layer]
    instance_map = np.asarray(instances, np.int32)[layer]

    # Keypoints, from face coordinates to pixels; visible where their part shows at that pixel.
    kp_uv = np.stack([
        np.stack([-0.32 + yaw, np.full(n, eye_v)], 1), np.stack([0.32 + yaw, np.full(n, eye_v)], 1),
        np.stack([nose_u, np.full(n, 0.3)], 1),
        np.stack([1.1 * yaw - 0.85 * width, mouth_v + p.smile * 0.6 * (0.85 * width) ** 2], 1),
        np.stack([1.1 * yaw + 0.85 * width, mouth_v + p.smile * 0.6 * (0.85 * width) ** 2], 1),
        np.stack([np.zeros(n), np.full(n, 0.9)], 1),
    ], 1).astype(np.float32)  # [N, K, 2]
    ku, kv = kp_uv[..., 0] * p.scale[:, None], kp_uv[..., 1] * p.scale[:, None]
    cos1, sin1 = np.cos(p.roll)[:, None], np.sin(p.roll)[:, None]
    kx = (p.cx[:, None] + ku * cos1 - kv * sin1) * size - 0.5  # pixel-index units: pixel j's centre is j
    ky = (p.cy[:, None] + ku * sin1 + kv * cos1) * size - 0.5
    col, row = np.floor(kx + 0.5).astype(int), np.floor(ky + 0.5).astype(int)
    inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    col, row = np.clip(col, 0, size - 1), np.clip(row, 0, size - 1)
    shown = mask[np.arange(n)[:, None], row, col] == np.asarray(KEYPOINT_CLASSES)[None]
    visibility = np.where(inside, np.where(shown, 2, 1), 0)
    keypoints = np.stack([kx, ky, visibility], -1).astype(np.float32)

    return [Scene(image8[b], mask[b], instance_map[b], list(PART_CLASSES), depth[b], keypoints[b], _prompt(p, b))
            for b in range(n)]


def _prompt(p: _Params, b: int) -> str:
    hair = "a bald face" if p.hair_style[b] == 2 else f"a face with {p.hair_name[b]} hair"
    words = ["a photo of", hair]
    if p.smile[b] > 0.6:
        words.append("smiling")
    if abs(p.yaw[b]) > 0.12:
        words.append("looking right" if p.yaw[b] > 0 else "looking left")
    words.append(f"on a {p.backdrop_name[b]} background")
    return " ".join(words)


def render(seed: int, size: int = 64, shift: WorldShift | None = None) -> Scene:
    return render_batch([seed], size, shift)[0]


def arrays(seeds: list[int] | range, resolution: int = 64, size: int = 64, batch: int = 256,
           shift: WorldShift | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, R, R, 3] uint8, masks [N, R, R] uint8) of `seeds` rendered at `size` and resized to
    `resolution` exactly as `factory labels import` and `factory pretrain` resize a folder of them
    (bicubic images, nearest masks), without the files: what a backbone trained on the folder saw."""
    from factory.data.images import square

    images, masks = [], []
    seeds = list(seeds)
    for first in range(0, len(seeds), batch):
        for scene in render_batch(seeds[first:first + batch], size, shift):
            if resolution == size:
                images.append(scene.image)
                masks.append(scene.mask)
            else:
                images.append(np.array(square(Image.fromarray(scene.image), resolution, Image.Resampling.BICUBIC)))
                masks.append(np.array(square(Image.fromarray(scene.mask), resolution, Image.Resampling.NEAREST)))
    return np.stack(images), np.stack(masks)


def write_folder(directory: str, num_images: int, start_seed: int = 0, size: int = 64, depth_scale: float = 1000.0,
                 batch: int = 256) -> str:
    """Render scenes start_seed .. start_seed + num_images - 1 as a labeled folder: images/, masks/
    (class ids), depth/ (16-bit, metres x depth_scale), instances.json (COCO: one annotation per
    visible part, the skin's carrying the face's keypoints), prompts.jsonl."""
    from pycocotools import mask as mask_utils

    batch = max(1, min(batch, 256 * 64 * 64 // (size * size)))  # a batch's arrays stay near 256 scenes at 64 px
    for sub in ("images", "masks", "depth"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    categories = [{"id": i, "name": c} for i, c in enumerate(CLASSES) if i]
    categories[CLASSES.index("skin") - 1].update(keypoints=list(KEYPOINTS), skeleton=[[1, 2], [1, 3], [2, 3], [4, 5], [3, 4], [3, 5], [4, 6], [5, 6]])
    coco = {"images": [], "annotations": [], "categories": categories}
    prompts = []
    for first in range(start_seed, start_seed + num_images, batch):
        seeds = range(first, min(first + batch, start_seed + num_images))
        for seed, scene in zip(seeds, render_batch(seeds, size)):
            image_id = seed - start_seed + 1
            name = f"face-{seed:06d}.png"
            Image.fromarray(scene.image).save(os.path.join(directory, "images", name))
            Image.fromarray(scene.mask).save(os.path.join(directory, "masks", name))
            depth = np.clip(np.round(scene.depth * depth_scale), 0, 65535).astype(np.uint16)
            Image.fromarray(depth).save(os.path.join(directory, "depth", name))
            coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
            for i, class_id in enumerate(scene.classes, 1):
                region = np.asfortranarray((scene.instances == i).astype(np.uint8))
                if not region.any():
                    continue  # fully hidden
                rle = mask_utils.encode(region)
                ann = {
                    "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": class_id,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": int(region.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                }
                if PARTS[i - 1] == "skin":
                    ann["keypoints"] = [round(float(v), 2) for v in scene.keypoints.reshape(-1)]
                    ann["num_keypoints"] = int((scene.keypoints[:, 2] > 0).sum())
                coco["annotations"].append(ann)
            prompts.append({"file": name, "prompt": scene.prompt})
    with open(os.path.join(directory, "instances.json"), "w") as f:
        json.dump(coco, f)
    with open(os.path.join(directory, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    return directory
