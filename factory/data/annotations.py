"""Annotations in, a validated labeled set out.

Reads what annotators produce for an exported folder (index-mask PNGs named like the images, or a
COCO JSON read with pycocotools, plus an optional `skip.txt`), checks every file against the export
record and the configured label names, and stores the result as one `labeled.safetensors`.
Every problem found is reported, each naming its file; nothing is written unless all pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from factory import tensorfile, textfile
from factory.config import ConfigError
from factory.config.checks import classes_hint

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


MASK_MODES = ("L", "P", "I", "I;16")
"""PNG modes a class-id mask may have, on both paths: 8-bit grey or palette indices, or 16/32-bit grey
(the ids are checked against labels.classes). Not mode 1 (bilevel): save it as L."""
MASK_PNG = f"a single-channel index PNG of class ids (mode {', '.join(MASK_MODES[:-1])} or {MASK_MODES[-1]})"


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
        attempted |= _read_coco(coco_path, images, size, task, label_names, masks, keypoints, problems)
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


def skipped(directory: str, problems: list[str]) -> set[str]:
    """The image names `directory`'s skip.txt lists (one per line, `#` comments), none without one."""
    path = os.path.join(directory, SKIP_FILE)
    if not os.path.isfile(path):
        return set()
    text = read_text(path, SKIP_FILE, problems)
    if text is None:
        return set()
    return {line.strip() for line in text.split("\n") if line.strip() and not line.startswith("#")}


def _read_skip(directory: str, images: dict, problems: list[str]) -> set[str]:
    names = skipped(directory, problems)
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
                if im.format != "PNG":  # a lossy JPEG saved as .png shifts class ids at every edge
                    problems.append(f"{rel}: its content is {im.format}, not PNG; save masks as lossless PNG")
                    continue
                if mode not in MASK_MODES:
                    problems.append(f"{rel}: mode {mode}; expected {MASK_PNG}")
                    continue
                if (w, h) != (size, size):
                    problems.append(f"{rel}: size {w}x{h}, expected {size}x{size} like {IMAGES_DIR}/{name}")
                    continue
                mask = np.array(im)
        except (OSError, Image.DecompressionBombError) as e:
            problems.append(f"{rel}: not a readable image ({e})")
            continue
        top = int(mask.max())
        if int(mask.min()) < 0:
            problems.append(f"{rel}: class id {int(mask.min())} is negative ({classes_hint(label_names)})")
            continue
        if top >= len(label_names):
            problems.append(f"{rel}: class id {top} is outside {classes_hint(label_names)}")
            continue
        out[name] = mask.astype(np.uint8)
    return found


def read_text(path: str, shown: str, problems: list[str]) -> str | None:
    """The UTF-8 text of `path` (a byte order mark dropped), or None with the reason in `problems`."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return textfile.decode(data, shown)
    except textfile.NotText as e:
        problems.append(str(e))
        return None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def compressed_runs(counts: str) -> list[int] | None:
    """The run lengths a COCO compressed RLE string encodes (the format of pycocotools' `encode`:
    each run a little-endian sequence of 5-bit groups in characters '0' + value, bit 0x20 continuing,
    bit 0x10 of the last group the sign, every run after the second stored as the difference from the
    run two before it); None for a string that is not one. pycocotools decodes a malformed string into
    a mask of whatever memory held, so it is checked here first."""
    runs: list[int] = []
    i = 0
    while i < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if i == len(counts):
                return None  # the string ends inside a run
            c = ord(counts[i]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            i, shift = i + 1, shift + 5
            if not more and c & 0x10:
                value -= 1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


def _segmentation_problem(seg: object, w: int, h: int) -> str | None:
    """What is wrong with one annotation's `segmentation` on a w x h image (None: nothing; a missing
    or empty one is no segmentation, which the reader judges by task)."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(_number(c) for c in counts))):
            return f'its RLE segmentation needs "counts" (a string or a list of run lengths), got {_short(counts)}'
        if size != [h, w]:
            return f"its RLE size {_short(size)} differs from its image's [height, width] [{h}, {w}]"
        runs = compressed_runs(counts) if isinstance(counts, str) else counts
        if runs is None or any(r < 0 for r in runs):
            return f'its compressed RLE "counts" {_short(counts)} is not a valid COCO run-length string'
        if sum(runs) != h * w:
            return f"its RLE run lengths sum to {sum(runs)}, not the image's {h}x{w} = {h * w} pixels"
        return None
    if not isinstance(seg, list):
        return f"segmentation must be polygons [[x1, y1, x2, y2, ...], ...] or RLE, got {_short(seg)}"
    if not all(isinstance(poly, list) for poly in seg):
        return f"segmentation {_short(seg)} is not a list of polygons: nest it, [[x1, y1, x2, y2, ...]]"
    for poly in seg:
        if not all(_number(v) for v in poly):
            return f"polygon {_short(poly)} holds a value that is not a finite number"
        if len(poly) % 2:
            return f"polygon {_short(poly)} has an odd number of coordinates ({len(poly)})"
        if len(poly) < 6:
            return f"polygon {_short(poly)} has {len(poly) // 2} points; a polygon needs at least 3"
        points = np.asarray(poly, dtype=float).reshape(-1, 2)
        if ((points < 0) | (points > (w, h))).any():
            return f"polygon {_short(poly)} lies outside its {w}x{h} image"
    return None


def _coco_problems(data: object, name: str) -> list[str]:
    """What makes `data` (a parsed COCO file called `name`) unusable: its structure, every image,
    category and annotation, each problem naming what it is about."""
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
        return [(f'{name}: a COCO file is a JSON object with "images", "annotations" and "categories"; '
                 f"this one holds {kind.get(type(data), 'null')}")]
    problems = []
    for key in ("images", "categories", "annotations"):
        if key not in data and key != "annotations":
            problems.append(f'{name}: no "{key}" list')
        elif not isinstance(data.get(key, []), list):
            problems.append(f'{name}: "{key}" must be a list, got {type(data[key]).__name__}')
    if problems:
        return problems
    sizes: dict = {}  # image id -> (width, height)
    file_of: dict = {}
    refused: set = set()  # ids of images already named as wrong: their annotations are not named again
    files: set[str] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), (int, str)) or isinstance(img.get("id"), bool):
            problems.append(f'{name}: images[{i}] needs an "id" (a number or a string)')
            continue
        file = img.get("file_name")
        if not isinstance(file, str) or not file:
            problems.append(f'{name}: image id {img["id"]!r} has no "file_name"')
            refused.add(img["id"])
            continue
        where = f"{name}: image {file!r}"
        w, h = img.get("width"), img.get("height")
        if os.path.isabs(file) or "\\" in file or ".." in file.split("/"):
            problems.append(f"{name}: image file_name {file!r} escapes the folder (absolute or '..')")
        elif not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
            problems.append(f'{where}: "width" and "height" must be positive whole numbers, got {w!r} and {h!r}')
        elif img["id"] in sizes:
            problems.append(f"{where}: image id {img['id']!r} is used twice")
        elif os.path.basename(file) in files:
            problems.append(f"{where} is listed twice")
        else:
            sizes[img["id"]], file_of[img["id"]] = (w, h), file
            files.add(os.path.basename(file))
            continue
        refused.add(img["id"])
    categories = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), (int, str)) or not isinstance(cat.get("name"), str):
            problems.append(f'{name}: categories[{i}] needs an "id" and a "name", got {_short(cat)}')
        elif cat["id"] in categories:
            problems.append(f"{name}: category id {cat['id']!r} is used twice")
        else:
            categories.add(cat["id"])
    seen = set()
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), (int, str)) or isinstance(ann.get("id"), bool):
            problems.append(f'{name}: annotations[{i}] needs an "id" (a number or a string)')
            continue
        where = f"{name}: annotation {ann['id']!r}"
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if ann["id"] in seen:
            problems.append(f"{where}: its id is used twice")
        elif isinstance(image_id, (int, str)) and image_id in refused:
            pass
        elif not isinstance(image_id, (int, str)) or image_id not in sizes:
            problems.append(f"{where}: image_id {_short(image_id)} is not in \"images\"" if "image_id" in ann
                            else f'{where}: has no "image_id"')
        elif not isinstance(category_id, (int, str)) or category_id not in categories:
            problems.append(f"{where}: category_id {_short(category_id)} is not in \"categories\""
                            if "category_id" in ann else f'{where}: has no "category_id"')
        else:
            problem = _segmentation_problem(ann.get("segmentation"), *sizes[image_id])
            if problem:
                problems.append(f"{where} of image {file_of[image_id]!r}: {problem}")
        seen.add(ann["id"])
    return problems


def open_coco(path: str, problems: list[str]):
    """A pycocotools COCO index of the file at `path`, or None with the reasons in `problems`: the
    file must be UTF-8 JSON (a byte order mark is fine) holding a COCO object whose every image has a
    file name and size, and whose every annotation names a listed image and category and has a
    well-formed segmentation (polygons of 3+ points inside the image, or RLE of the image's size)."""
    from pycocotools.coco import COCO

    name = os.path.basename(path)
    text = read_text(path, name, problems)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{name}: not JSON ({e.msg} at line {e.lineno} column {e.colno})")
        return None
    found = _coco_problems(data, name)
    if found:
        problems += found
        return None
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _annotation_order(ann: dict) -> tuple:
    """Annotations by id (numbers before strings): later ones paint over earlier ones."""
    return isinstance(ann["id"], str), ann["id"]


def has_segmentation(ann: dict) -> bool:
    return ann.get("segmentation") not in (None, [])


def has_keypoints(ann: dict) -> bool:
    return bool(ann.get("keypoints")) and ann.get("num_keypoints", 1) != 0


def coco_keypoints(ann: dict, size: tuple[int, int], names: list[str], where: str,
                   problems: list[str]) -> np.ndarray | None:
    """One annotation's keypoints as [K, 3] float32 (x, y, visibility), or None with the reason in
    `problems` (`where` names the file, annotation and image): K must match `names`, values be
    finite, visibility 0, 1 or 2, and every labeled point (visibility > 0) lie in the w x h image."""
    kp = ann.get("keypoints")
    if not isinstance(kp, list) or len(kp) % 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in kp):
        problems.append(f"{where}: keypoints must be a flat list of x, y, visibility numbers, got {_short(kp)}")
        return None
    if len(kp) != 3 * len(names):
        problems.append(f"{where} has {len(kp) // 3} keypoints, expected {len(names)} (labels.keypoints)")
        return None
    points = np.asarray(kp, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(points).all():
        problems.append(f"{where}: keypoints hold NaN or infinite values")
        return None
    bad = [v for v in points[:, 2].tolist() if v not in (0, 1, 2)]
    if bad:
        problems.append(f"{where}: keypoint visibility must be 0, 1 or 2, got {bad[0]:g}")
        return None
    w, h = size
    for k, (x, y, v) in enumerate(points.tolist()):
        if v > 0 and not (0 <= x <= w and 0 <= y <= h):
            problems.append(f"{where}: keypoint {names[k]!r} at ({x:g}, {y:g}) is outside its {w}x{h} image")
            return None
    return points.astype(np.float32)


def check_keypoint_names(coco, names: list[str], name: str, problems: list[str]) -> None:
    """A category that lists its keypoints (COCO may leave them out) must list `names` in order."""
    for cat in coco.dataset["categories"]:
        listed = cat.get("keypoints")
        if listed and listed != list(names):
            problems.append(f"{name}: category {cat['name']!r} names its keypoints {listed!r}, "
                            f"but labels.keypoints is {list(names)} (the same names in the same order)")


def _read_coco(
    path: str,
    images: dict,
    size: int,
    task: str,
    label_names: list[str],
    masks: dict,
    keypoints: dict,
    problems: list[str],
) -> set[str]:
    """Reads the file into `masks` or `keypoints`; returns the images it labels, rightly or not
    (every image when the file as a whole is refused: that is the problem, not each image)."""
    coco = open_coco(path, problems)
    if coco is None:
        return set(images)
    name = os.path.basename(path)
    attempted = set()
    class_of = {}
    for cat in coco.loadCats(coco.getCatIds()):
        if task == "segmentation" and cat["name"] not in label_names:
            problems.append(f"{name}: category {cat['name']!r} (id {cat['id']}) is not in "
                            f"{classes_hint(label_names, [cat['name']])}")
        elif task == "segmentation":
            class_of[cat["id"]] = label_names.index(cat["name"])
    if task == "keypoints":
        check_keypoint_names(coco, label_names, name, problems)
    for img in coco.loadImgs(coco.getImgIds()):
        file = os.path.basename(img["file_name"])
        where = f"{name}: image {img['file_name']!r}"
        if file not in images:
            problems.append(f"{where} is not an exported image")
            continue
        if (img["width"], img["height"]) != (size, size):
            problems.append(f"{where} has size {img['width']}x{img['height']}, expected {size}x{size}")
            attempted.add(file)
            continue
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])), key=_annotation_order)
        if task == "segmentation":
            if file in masks:
                problems.append(f"{where} is labeled twice: in {MASKS_DIR}/{file} and in {name}")
                continue
            mask = np.zeros((size, size), dtype=np.uint8)
            for ann in anns:  # later annotations paint over earlier ones
                if not has_segmentation(ann):
                    if not ann.get("keypoints"):  # a keypoint-only annotation draws nothing; a bbox alone is no mask
                        problems.append(f"{name}: annotation {ann['id']!r} of image {img['file_name']!r} has no "
                                        "segmentation (polygons or RLE); a bbox alone draws no mask")
                elif ann["category_id"] in class_of:
                    mask[coco.annToMask(ann) > 0] = class_of[ann["category_id"]]
            masks[file] = mask
        else:
            with_kp = [a for a in anns if has_keypoints(a)]
            if not with_kp:
                continue
            where = f"{name}: annotation {with_kp[0]['id']!r} of image {img['file_name']!r}"
            kp = coco_keypoints(with_kp[0], (size, size), label_names, where, problems)
            attempted.add(file)
            if kp is not None:
                keypoints[file] = kp
    return attempted


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
