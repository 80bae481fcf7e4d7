"""Annotations in, a validated labeled set out.

Reads what annotators produce for an exported folder (index-mask PNGs named like the images, or a
COCO JSON read with pycocotools, plus an optional `skip.txt`), checks every file against the export
record and the configured label names, and stores the result as one `labeled.safetensors`.
Every problem found is reported, each naming its file; nothing is written unless all pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from factory import tensorfile
from factory.config import ConfigError

EXPORT_RECORD = "export.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
COCO_FILE = "coco.json"
SKIP_FILE = "skip.txt"


class AnnotationError(ValueError):
    """One or more annotation files are wrong; `problems` lists each with its file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        super().__init__(f"{len(problems)} annotation problem(s): {shown}")


@dataclass
class LabeledSet:
    task: str
    label_names: list[str]
    files: list[str]
    seeds: torch.Tensor
    """[N] int64: the seed each labeled image was generated from."""
    image_sha256: list[str]
    """sha256 of each exported image's uint8 pixels, to prove regeneration reproduces it."""
    backbone_hash: str
    psi: float
    masks: torch.Tensor | None = None
    """[N, H, W] uint8 class ids (segmentation)."""
    keypoints: torch.Tensor | None = None
    """[N, K, 3] float32 (x, y, visibility) (keypoints)."""
    images: torch.Tensor | None = None
    """[N, H, W, 3] uint8: the exported pixels, so regeneration can be checked to within float noise
    (another thread count may move a few pixels by a grey level, which changes the sha256)."""
    batches: list[list[int]] | None = None
    """The seeds of each forward pass the export ran (labeled or not): an image is regenerated in its
    own batch, since batched float results depend on the batch. None: one seed per pass."""
    latents: torch.Tensor | None = None
    """[M, D] float32: the user's own latents the export rendered (`annotate.latents`), one row per
    exported image (labeled or not: a batch is regenerated whole), in the order of `latent_seeds`;
    None when the images came from their seeds."""
    latent_seeds: torch.Tensor | None = None
    """[M] int64: the seed of each row of `latents` (its noise and class)."""
    latent_space: str | None = None
    """"z" or "w": what `latents` holds."""

    def batches_to_regenerate(self) -> list[list[int]]:
        """The export's batches that hold a labeled seed (every seed alone for sets without them)."""
        labeled = set(self.seeds.tolist())
        if self.batches is None:
            return [[s] for s in self.seeds.tolist()]
        return [b for b in self.batches if labeled & set(b)]

    def latents_of(self, seeds: list[int]) -> torch.Tensor:
        """The user's latents the export rendered for `seeds`."""
        row = {s: i for i, s in enumerate(self.latent_seeds.tolist())}
        return self.latents[[row[s] for s in seeds]]


def pixels_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def read_latents(path: str, space: str, dim: int, num_ws: int) -> np.ndarray:
    """A user's latents (`annotate.latents`) as [N, dim] float32: a numeric .npy of [N, dim], or for w
    [N, num_ws, dim] whose per-layer rows are equal (a projector's broadcast w). Read with
    allow_pickle=False, so the file can hold numbers only."""
    key = f"annotate.latents={path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{key}: not a readable numeric .npy array ({str(e).splitlines()[0]})") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise ConfigError(f"{key}: holds {getattr(array, 'dtype', type(array).__name__)}, expected float latents")
    if array.ndim == 3 and space == "w" and array.shape[1:] == (num_ws, dim):
        if not np.array_equal(array, np.repeat(array[:, :1], num_ws, axis=1)):
            raise ConfigError(f"{key}: its {num_ws} per-layer w differ (style mixing); one w per image is supported")
        array = array[:, 0]
    if array.ndim != 2 or array.shape[1] != dim or array.shape[0] == 0:
        wanted = f"[N, {dim}]" + (f" or [N, {num_ws}, {dim}]" if space == "w" else "")
        raise ConfigError(f"{key}: shape {list(array.shape)}, expected {wanted} for annotate.latent_space={space}")
    if not np.isfinite(array).all():
        raise ConfigError(f"{key}: holds NaN or infinite values")
    return array.astype(np.float32)


def read_export(directory: str) -> dict:
    path = os.path.join(directory, EXPORT_RECORD)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `factory annotate export` first")
    with open(path) as f:
        return json.load(f)


def import_annotations(directory: str, task: str, label_names: list[str]) -> LabeledSet:
    """Read and validate everything the annotators left in `directory`."""
    export = read_export(directory)
    images = {entry["file"]: entry for entry in export["images"]}
    size = export["resolution"]
    problems: list[str] = []

    skipped = _read_skip(directory, images, problems)
    masks: dict[str, np.ndarray] = {}
    keypoints: dict[str, np.ndarray] = {}
    attempted: set[str] = set()  # labeled, though maybe wrongly: reported once, not also as missing
    if task == "segmentation":
        attempted = _read_masks(directory, images, size, label_names, masks, problems)
    coco_path = os.path.join(directory, COCO_FILE)
    for rel in [COCO_FILE, *(f"{IMAGES_DIR}/{name}" for name in sorted(images))]:
        if os.path.islink(os.path.join(directory, rel)):
            problems.append(f"{rel}: a symbolic link; a labeled folder holds its files, not links out of it")
    if os.path.isfile(coco_path) and not os.path.islink(coco_path):
        _read_coco(coco_path, images, size, task, label_names, masks, keypoints, problems)
    labeled = masks if task == "segmentation" else keypoints
    for name in sorted(images):
        if name in labeled and name in skipped:
            problems.append(f"{SKIP_FILE}: {name} is labeled but also listed as skipped")
        elif name not in labeled and name not in skipped and name not in attempted:
            problems.append(
                f"{IMAGES_DIR}/{name}: not labeled (no {MASKS_DIR}/{name} and no {COCO_FILE} annotation) "
                f"and not listed in {SKIP_FILE}"
            )
    if not problems and not labeled:
        problems.append(f"{directory}: every image is skipped; nothing to train on")
    if problems:
        raise AnnotationError(problems)

    files = sorted(labeled, key=lambda name: images[name]["seed"])
    given = export.get("latents")  # the user's own latents, recorded by export
    exported = sorted(export["images"], key=lambda e: e["seed"])
    pixels = []
    for name in files:
        with Image.open(os.path.join(directory, IMAGES_DIR, name)) as im:
            pixels.append(np.array(im.convert("RGB")))
    return LabeledSet(
        images=torch.from_numpy(np.stack(pixels)),
        task=task,
        label_names=list(label_names),
        files=files,
        seeds=torch.tensor([images[n]["seed"] for n in files], dtype=torch.int64),
        image_sha256=[images[n]["sha256"] for n in files],
        backbone_hash=export["backbone_hash"],
        psi=export["psi"],
        masks=torch.from_numpy(np.stack([masks[n] for n in files])) if task == "segmentation" else None,
        keypoints=torch.from_numpy(np.stack([keypoints[n] for n in files])) if task == "keypoints" else None,
        batches=export.get("batches"),
        latents=torch.tensor([e["latent"] for e in exported], dtype=torch.float32) if given else None,
        latent_seeds=torch.tensor([e["seed"] for e in exported], dtype=torch.int64) if given else None,
        latent_space=given["space"] if given else None,
    )


def _read_skip(directory: str, images: dict, problems: list[str]) -> set[str]:
    path = os.path.join(directory, SKIP_FILE)
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        names = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    for name in sorted(names - set(images)):
        problems.append(f"{SKIP_FILE}: {name} is not an exported image")
    return names & set(images)


def _read_masks(
    directory: str, images: dict, size: int, label_names: list[str], out: dict, problems: list[str]
) -> set[str]:
    """Valid masks go into `out`; returns the names of every mask file found for an exported image."""
    mask_dir = os.path.join(directory, MASKS_DIR)
    if not os.path.isdir(mask_dir):
        return set()
    found = {name for name in os.listdir(mask_dir) if name in images}
    for name in sorted(os.listdir(mask_dir)):
        rel = f"{MASKS_DIR}/{name}"
        if name.startswith("."):
            continue
        if name not in images:
            problems.append(f"{rel}: no exported image named {IMAGES_DIR}/{name}")
            continue
        if os.path.islink(os.path.join(mask_dir, name)):
            problems.append(f"{rel}: a symbolic link; a labeled folder holds its files, not links out of it")
            continue
        try:  # mode and size come from the header: nothing larger than the export is ever decoded
            with Image.open(os.path.join(mask_dir, name)) as im:
                mode, (w, h) = im.mode, im.size
                if mode not in ("L", "P", "I", "I;16"):
                    problems.append(f"{rel}: mode {mode}; expected a single-channel index PNG (mode L or P) of class ids")
                    continue
                if (w, h) != (size, size):
                    problems.append(f"{rel}: size {w}x{h}, expected {size}x{size} like {IMAGES_DIR}/{name}")
                    continue
                mask = np.array(im)
        except (OSError, Image.DecompressionBombError) as e:
            problems.append(f"{rel}: not a readable image ({e})")
            continue
        top = int(mask.max())
        if top >= len(label_names):
            problems.append(
                f"{rel}: class id {top} is outside labels.classes (0..{len(label_names) - 1}: {label_names})"
            )
            continue
        out[name] = mask.astype(np.uint8)
    return found


def open_coco(path: str, problems: list[str]):
    """A pycocotools COCO index of the file at `path`, or None with the reason in `problems`."""
    from pycocotools.coco import COCO

    try:
        with open(path) as f:
            data = json.load(f)
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        problems.append(f"{os.path.basename(path)}: not a COCO annotation file ({type(e).__name__}: {e})")
        return None
    name = os.path.basename(path)
    for img in coco.loadImgs(coco.getImgIds()):
        file = str(img.get("file_name", ""))
        if os.path.isabs(file) or "\\" in file or ".." in file.split("/"):
            problems.append(f"{name}: image file_name {file!r} escapes the folder (absolute or '..')")
    for ann in coco.dataset.get("annotations", []):
        img = coco.imgs.get(ann.get("image_id"), {})
        w, h, seg = img.get("width"), img.get("height"), ann.get("segmentation")
        if w and h and isinstance(seg, list):
            points = [np.asarray(poly, dtype=float).reshape(-1, 2) for poly in seg if len(poly) >= 6]
            if any(((p < 0) | (p > (w, h))).any() for p in points):
                problems.append(f"{name}: annotation {ann.get('id')} of image {img.get('file_name')!r} has a polygon "
                                f"outside its {w}x{h} image")
    return coco


def _read_coco(
    path: str,
    images: dict,
    size: int,
    task: str,
    label_names: list[str],
    masks: dict,
    keypoints: dict,
    problems: list[str],
) -> None:
    coco = open_coco(path, problems)
    if coco is None:
        return
    name = os.path.basename(path)
    class_of = {}
    for cat in coco.loadCats(coco.getCatIds()):
        if task == "segmentation" and cat["name"] not in label_names:
            problems.append(f"{name}: category {cat['name']!r} (id {cat['id']}) is not in labels.classes {label_names}")
        elif task == "segmentation":
            class_of[cat["id"]] = label_names.index(cat["name"])
    for img in coco.loadImgs(coco.getImgIds()):
        file = os.path.basename(img["file_name"])
        where = f"{name}: image {img['file_name']!r}"
        if file not in images:
            problems.append(f"{where} is not an exported image")
            continue
        if (img.get("width"), img.get("height")) != (size, size):
            problems.append(f"{where} has size {img.get('width')}x{img.get('height')}, expected {size}x{size}")
            continue
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])), key=lambda a: a["id"])
        if task == "segmentation":
            if file in masks:
                problems.append(f"{where} is labeled twice: in {MASKS_DIR}/{file} and in {name}")
                continue
            mask = np.zeros((size, size), dtype=np.uint8)
            for ann in anns:  # later annotations paint over earlier ones
                if ann["category_id"] in class_of:
                    mask[coco.annToMask(ann) > 0] = class_of[ann["category_id"]]
            masks[file] = mask
        else:
            with_kp = [a for a in anns if a.get("num_keypoints", 1) and a.get("keypoints")]
            if not with_kp:
                continue
            kp = np.asarray(with_kp[0]["keypoints"], dtype=np.float32)
            if kp.size != 3 * len(label_names):
                problems.append(
                    f"{where} has {kp.size // 3} keypoints, expected {len(label_names)} (labels.keypoints)"
                )
                continue
            keypoints[file] = kp.reshape(-1, 3)


FORMAT = "factory.labeled_set"


def save_labeled_set(path: str, labeled: LabeledSet) -> None:
    tensors = {"seeds": labeled.seeds}
    for name in ("masks", "keypoints", "images", "latents", "latent_seeds"):
        if getattr(labeled, name) is not None:
            tensors[name] = getattr(labeled, name)
    metadata = {
        "task": labeled.task,
        "labels": json.dumps(labeled.label_names),
        "files": json.dumps(labeled.files),
        "image_sha256": json.dumps(labeled.image_sha256),
        "backbone_hash": labeled.backbone_hash,
        "psi": repr(labeled.psi),
    }
    if labeled.batches is not None:
        metadata["batches"] = json.dumps(labeled.batches)
    if labeled.latent_space is not None:
        metadata["latent_space"] = labeled.latent_space
    tensorfile.write(path, tensors, FORMAT, metadata)


def load_labeled_set(path: str) -> LabeledSet:
    tensors, metadata = tensorfile.read(path, FORMAT, "labeled set", "run `factory annotate import` first")
    return LabeledSet(
        task=metadata["task"],
        label_names=json.loads(metadata["labels"]),
        files=json.loads(metadata["files"]),
        seeds=tensors["seeds"],
        image_sha256=json.loads(metadata["image_sha256"]),
        backbone_hash=metadata["backbone_hash"],
        psi=float(metadata["psi"]),
        masks=tensors.get("masks"),
        keypoints=tensors.get("keypoints"),
        images=tensors.get("images"),
        batches=json.loads(metadata["batches"]) if "batches" in metadata else None,
        latents=tensors.get("latents"),
        latent_seeds=tensors.get("latent_seeds"),
        latent_space=metadata.get("latent_space"),
    )
