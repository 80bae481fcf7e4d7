"""Real labeled images in, a validated labeled set out (the diffusion path's training data).

A labeled folder holds, per image NAME (any of .png, .jpg, .jpeg, .webp under images/):

    images/NAME.png          the photo (RGB; any size: resized on its short side, centre-cropped)
    masks/NAME.png           semantic mask: single-channel class ids (labels.classes order)
    depth/NAME.png           16-bit depth: metres x labels.depth_scale, 0 where unknown
    instances.json           COCO instances (file_name = NAME.png): instance masks, and keypoints
    prompts.jsonl            {"file": "NAME.png", "prompt": "..."} or {"file": ..., "classes": [...]}

Which labels each image must have follows `decoder.tasks` (segmentation: a mask PNG or COCO
instances; instances: COCO; depth: a depth PNG; keypoints: COCO keypoints). An image with no prompt
row gets one made from its classes ("a photo of a cat and a dog"). Every problem is listed with its
file; nothing is written unless all pass. The set is stored as one safetensors file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from factory import storage, tensorfile
from factory.config.checks import classes_hint
from factory.data.annotations import (
    MASK_MODES,
    MASK_PNG,
    AnnotationError,
    check_keypoint_names,
    coco_keypoints,
    has_keypoints,
    has_segmentation,
    open_coco,
    read_text,
)
from factory.data.images import IMAGE_EXTENSIONS, square, to_rgb

IMAGES_DIR, MASKS_DIR, DEPTH_DIR = "images", "masks", "depth"
COCO_FILE, PROMPTS_FILE = "instances.json", "prompts.jsonl"
DEPTH_MODES = ("I;16", "I", "I;16B")
"""Depth maps: 16-bit grey only. An 8-bit map (mode L) would read as at most 255 x 1/depth_scale
metres, silently wrong, so it is refused."""
FORMAT = "factory.real_labeled_set"


@dataclass
class RealLabeledSet:
    tasks: list[str]
    classes: list[str]
    keypoint_names: list[str]
    files: list[str]
    prompts: list[str]
    images: torch.Tensor
    """[N, R, R, 3] uint8 at the backbone's resolution."""
    masks: torch.Tensor | None = None
    """[N, R, R] uint8 class ids."""
    depth: torch.Tensor | None = None
    """[N, R, R] float32 metres, 0 where unknown."""
    instance_map: torch.Tensor | None = None
    """[N, R, R] int32: 0 background, i for the i-th entry of instance_classes[n]."""
    instance_classes: list[list[int]] = field(default_factory=list)
    keypoints: torch.Tensor | None = None
    """[N, K, 3] float32 (x, y, visibility) in resized pixels."""

    @property
    def task(self) -> str:
        return "+".join(self.tasks)


def mirror_partners(names: list[str]) -> list[int]:
    """For each keypoint name, the index of its left-right partner in a mirrored image: the name with
    the word "left" and "right" swapped ("left_eye" <-> "right_eye", "mouth-left" <-> "mouth-right",
    case kept); a name without the word, or whose partner is absent, maps to itself."""
    def swapped(name: str) -> str:
        words = re.split(r"([^A-Za-z0-9]+)", name)
        table = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
        return "".join(table.get(w, w) for w in words)

    index = {n: i for i, n in enumerate(names)}
    return [index.get(swapped(n), i) for i, n in enumerate(names)]


def views(labeled: RealLabeledSet, rows: list[tuple[int, bool]]) -> RealLabeledSet:
    """The set of `rows` (index, mirrored): each the labeled image `index`, mirrored left to right
    with all its labels when `mirrored` (keypoints to x' = width - 1 - x, left and right partners
    swapped by `mirror_partners`). Training's augmentation (`train.flip`); a mirrored row is a new
    labeled image, valid only where no class tells left from right."""
    pick = torch.tensor([i for i, _ in rows], dtype=torch.long)
    flip = torch.tensor([m for _, m in rows], dtype=torch.bool)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t[pick]
        return torch.where(flip.view(-1, *[1] * (t.dim() - 1)), t.flip(2), t)  # [N, H, W, ...]: W is dim 2

    keypoints = None
    if labeled.keypoints is not None:
        keypoints = labeled.keypoints[pick].clone()
        width = labeled.images.shape[2]
        mirrored = keypoints[:, mirror_partners(labeled.keypoint_names)].clone()
        mirrored[..., 0] = width - 1 - mirrored[..., 0]
        keypoints = torch.where(flip.view(-1, 1, 1), mirrored, keypoints)
    return RealLabeledSet(
        tasks=list(labeled.tasks), classes=list(labeled.classes), keypoint_names=list(labeled.keypoint_names),
        files=[labeled.files[i] + (" (mirrored)" if m else "") for i, m in rows],
        prompts=[labeled.prompts[i] for i, _ in rows],
        images=take(labeled.images), masks=take(labeled.masks), depth=take(labeled.depth),
        instance_map=take(labeled.instance_map),
        instance_classes=[list(labeled.instance_classes[i]) for i, _ in rows] if labeled.instance_classes else [],
        keypoints=keypoints,
    )


def _crop_transform(w: int, h: int, size: int):
    """Maps original (x, y) pixel coordinates to the resized, cropped image's."""
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    return lambda x, y: ((x + 0.5) * nw / w - 0.5 - left, (y + 0.5) * nh / h - 0.5 - top)


def import_folder(directory: str, tasks: list[str], classes: list[str], keypoint_names: list[str],
                  resolution: int, depth_scale: float) -> RealLabeledSet:
    """Read and validate a labeled folder; raises AnnotationError listing every problem."""
    problems: list[str] = []
    image_dir = os.path.join(directory, IMAGES_DIR)
    if not os.path.isdir(image_dir):
        raise AnnotationError([f"{directory}: no {IMAGES_DIR}/ folder of images"])
    names = sorted(n for n in os.listdir(image_dir) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not names:
        raise AnnotationError([f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})"])
    stems = {os.path.splitext(n)[0]: n for n in names}
    for stem in sorted(stems):
        same = [n for n in names if os.path.splitext(n)[0] == stem]
        if len(same) > 1:
            problems.append(f"{IMAGES_DIR}/: {', '.join(same)} share the name {stem!r}; keep one")
    for name in names:
        if os.path.islink(os.path.join(image_dir, name)):
            problems.append(f"{IMAGES_DIR}/{name}: a symbolic link; a labeled folder holds its files, not links out of it")
    names = [n for n in names if not os.path.islink(os.path.join(image_dir, n))]
    prompts = read_prompts(directory, names, classes, problems)
    wanted_keypoints = keypoint_names if "keypoints" in tasks else None  # others' keypoints are not our business
    need_masks = "segmentation" in tasks or "instances" in tasks
    coco = _read_coco(directory, names, classes, wanted_keypoints, need_masks, problems) if os.path.isfile(
        os.path.join(directory, COCO_FILE)) else {}
    coco_refused = coco is None  # the file as a whole: named once, not again as each image's missing labels
    coco = coco or {}

    images, masks, depths, inst_maps, inst_classes, kps, texts = [], [], [], [], [], [], []
    for name in names:
        stem = os.path.splitext(name)[0]
        rel = f"{IMAGES_DIR}/{name}"
        try:
            with Image.open(os.path.join(image_dir, name)) as im:
                upright = to_rgb(im)  # its labels are drawn on the photo as a viewer shows it
                size = upright.size
                rgb = np.array(square(upright, resolution, Image.Resampling.BICUBIC))
        except (OSError, Image.DecompressionBombError) as e:  # a bomb: refused before decoding
            problems.append(f"{rel}: not a readable image ({e})")
            continue
        images.append(rgb)
        ann = coco.get(name)
        if ann is not None and ann["size"] != size:
            problems.append(f"{COCO_FILE}: image {name!r} has width x height {ann['size'][0]}x{ann['size'][1]}, "
                            f"but {rel} is {size[0]}x{size[1]}")
            ann = None
        mask = _read_png(directory, MASKS_DIR, stem, size, problems, MASK_MODES, MASK_PNG)
        if mask is not None and (int(mask.min()) < 0 or int(mask.max()) >= len(classes)):
            bad = int(mask.min()) if int(mask.min()) < 0 else int(mask.max())
            problems.append(f"{MASKS_DIR}/{stem}.png: class id {bad} is outside {classes_hint(classes)}")
            mask = None
        if mask is None and ann is not None and ann["instances"]:  # COCO instances draw the semantic mask
            mask = _paint(ann["instances"], size)
        # the labels as trained on: resized and centre-cropped like the photo (the prompt names only these)
        cropped = None if mask is None else np.array(square(Image.fromarray(mask.astype(np.uint8)), resolution,
                                                            Image.Resampling.NEAREST))
        coco_named = coco_refused or any(p.startswith(COCO_FILE) and f"image {name!r}" in p for p in problems)
        if "segmentation" in tasks:
            if mask is None and not coco_named and not any(p.startswith(f"{MASKS_DIR}/{stem}.") for p in problems):
                problems.append(f"{rel}: no semantic mask (no {MASKS_DIR}/{stem}.png and no {COCO_FILE} instances)")
            masks.append(cropped)
        if "depth" in tasks:
            depth = _read_png(directory, DEPTH_DIR, stem, size, problems, DEPTH_MODES,
                              "a 16-bit single-channel depth PNG", required=True)
            depths.append(None if depth is None else np.array(
                square(Image.fromarray(depth.astype(np.float32) / depth_scale, mode="F"), resolution,
                       Image.Resampling.NEAREST)))
        if "instances" in tasks:
            if ann is None:
                if not coco_named:
                    problems.append(f"{rel}: no {COCO_FILE} entry (instances task)")
                inst_maps.append(None)
                inst_classes.append([])
            else:
                imap = np.zeros(size[::-1], np.int32)
                for i, (_, m) in enumerate(ann["instances"], 1):
                    imap[m > 0] = i
                inst_maps.append(np.array(square(Image.fromarray(imap, mode="I"), resolution, Image.Resampling.NEAREST)))
                inst_classes.append([c for c, _ in ann["instances"]])
        if "keypoints" in tasks:
            if ann is None or ann["keypoints"] is None:
                if not coco_named:
                    problems.append(f"{rel}: no keypoints in {COCO_FILE} (keypoints task)")
                kps.append(None)
            else:
                move = _crop_transform(*size, resolution)
                kp = ann["keypoints"].copy()
                for row in kp:
                    row[0], row[1] = move(row[0], row[1])
                    if not (-0.5 <= row[0] <= resolution - 0.5 and -0.5 <= row[1] <= resolution - 0.5):
                        row[2] = 0  # the crop removed it: not visible in the image trained on
                kps.append(kp)
        texts.append(prompts.get(name) or _prompt_from(cropped, classes))
    orphans = [f"{sub}/{n}" for sub in (MASKS_DIR, DEPTH_DIR) if os.path.isdir(os.path.join(directory, sub))
               for n in sorted(os.listdir(os.path.join(directory, sub)))
               if not n.startswith(".") and os.path.splitext(n)[0] not in stems]
    problems += [f"{o}: no image named {IMAGES_DIR}/{os.path.splitext(os.path.basename(o))[0]}.*" for o in orphans]
    if problems:
        raise AnnotationError(problems)
    return RealLabeledSet(
        tasks=list(tasks), classes=list(classes), keypoint_names=list(keypoint_names), files=names, prompts=texts,
        images=torch.from_numpy(np.stack(images)),
        masks=torch.from_numpy(np.stack(masks).astype(np.uint8)) if "segmentation" in tasks else None,
        depth=torch.from_numpy(np.stack(depths).astype(np.float32)) if "depth" in tasks else None,
        instance_map=torch.from_numpy(np.stack(inst_maps)) if "instances" in tasks else None,
        instance_classes=inst_classes,
        keypoints=torch.from_numpy(np.stack(kps).astype(np.float32)) if "keypoints" in tasks else None,
    )


def import_labels(cfg) -> RealLabeledSet:
    """`factory labels import`: labels.dir -> train.labeled, checked against the config."""
    if cfg.backbone.kind != "diffusion" or cfg.decoder.kind != "perception":
        raise AnnotationError(["labels import is for the diffusion path (backbone.kind: diffusion, decoder.kind: "
                               "perception); the GAN path uses `factory annotate import`"])
    if cfg.labels.dir is None:
        raise AnnotationError(["labels.dir is not set: point it at the folder of labeled images"])
    from factory.backbones.diffusion import check_prompt_lengths

    labeled = import_folder(cfg.labels.dir, cfg.decoder.tasks, cfg.labels.classes, cfg.labels.keypoints,
                            cfg.backbone.diffusion.resolution, cfg.labels.depth_scale)
    # the same check `factory generate` runs: CLIP would cut a long prompt silently in training
    check_prompt_lengths(cfg.backbone.weights, labeled.prompts,
                         f"{os.path.join(cfg.labels.dir, PROMPTS_FILE)} (or made from classes)",
                         [f"the prompt of {IMAGES_DIR}/{name}" for name in labeled.files])
    storage.write_file(cfg.train.labeled, lambda path: save_real_labeled_set(path, labeled))
    return labeled


def _read_png(directory: str, sub: str, stem: str, size: tuple[int, int], problems: list[str], modes: tuple,
              what: str, required: bool = False) -> np.ndarray | None:
    path = os.path.join(directory, sub, f"{stem}.png")
    rel = f"{sub}/{stem}.png"
    if os.path.islink(path):
        problems.append(f"{rel}: a symbolic link; a labeled folder holds its files, not links out of it")
        return None
    if not os.path.isfile(path):
        if required:
            problems.append(f"{IMAGES_DIR}/{stem}: no {rel}")
        return None
    try:
        with Image.open(path) as im:
            mode, got, kind = im.mode, im.size, im.format
            data = np.array(im) if kind == "PNG" else None
    except (OSError, Image.DecompressionBombError) as e:
        problems.append(f"{rel}: not a readable image ({e})")
        return None
    if kind != "PNG":  # a lossy JPEG saved as .png shifts class ids and depths at every edge
        problems.append(f"{rel}: its content is {kind}, not PNG; save it as lossless PNG")
        return None
    if mode not in modes:
        problems.append(f"{rel}: mode {mode}; expected {what}")
        return None
    if got != size:
        problems.append(f"{rel}: size {got[0]}x{got[1]}, expected {size[0]}x{size[1]} like its image")
        return None
    return data


def read_prompts(directory: str, names: list[str], classes: list[str] | None, problems: list[str]) -> dict[str, str]:
    """`directory`/prompts.jsonl as {image file: prompt}; a row with "classes" and no "prompt" gets
    "a photo of a <class> and ...". Every bad row is appended to `problems` with its line; class
    names are checked against `classes` unless it is None."""
    path = os.path.join(directory, PROMPTS_FILE)
    if not os.path.isfile(path):
        return {}
    out: dict[str, str] = {}
    content = read_text(path, PROMPTS_FILE, problems)  # UTF-8, a byte order mark dropped
    if content is None:
        return out
    for n, line in enumerate(content.split("\n"), 1):  # only \n ends a row (JSON strings may hold U+2028)
        if not line.strip():
            continue
        where = f"{PROMPTS_FILE}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or row.get("file") not in names:
            problems.append(f"{where}: \"file\" must name one of the images, got "
                            f"{row.get('file') if isinstance(row, dict) else row!r}")
            continue
        text, named = row.get("prompt"), row.get("classes")
        if named is not None and not (isinstance(named, list) and all(isinstance(c, str) for c in named)):
            problems.append(f"{where}: \"classes\" must be a list of names, got {named!r}")
            continue
        unknown = [c for c in named or [] if classes is not None and c not in classes]
        if unknown:
            problems.append(f"{where}: unknown classes {unknown} ({classes_hint(classes, unknown)})")
        elif isinstance(text, str) and text.strip():
            out[row["file"]] = text.strip()
        elif named:
            out[row["file"]] = "a photo of " + " and ".join(f"a {c}" for c in named)
        else:
            problems.append(f"{where}: needs a non-empty \"prompt\" or a \"classes\" list")
    return out


def _read_coco(directory: str, names: list[str], classes: list[str], keypoint_names: list[str] | None,
               need_masks: bool, problems: list[str]) -> dict[str, dict] | None:
    """file name -> {"size": (w, h), "instances": [(class id, mask)], "keypoints": [K, 3] or None}, or
    None when the file as a whole is refused;
    keypoints are read only when `keypoint_names` is given (the keypoints task). With `need_masks`
    an annotation without a segmentation is refused unless it carries keypoints (it draws nothing)."""
    coco = open_coco(os.path.join(directory, COCO_FILE), problems)
    if coco is None:
        return None
    class_of = {}
    for cat in coco.loadCats(coco.getCatIds()):
        if cat["name"] not in classes:
            problems.append(f"{COCO_FILE}: category {cat['name']!r} (id {cat['id']}) is not in "
                            f"{classes_hint(classes, [cat['name']])}")
        else:
            class_of[cat["id"]] = classes.index(cat["name"])
    if keypoint_names is not None:
        check_keypoint_names(coco, keypoint_names, COCO_FILE, problems)
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        file = os.path.basename(img["file_name"])
        if file not in names:
            problems.append(f"{COCO_FILE}: image {img['file_name']!r} is not under {IMAGES_DIR}/")
            continue
        size = (img["width"], img["height"])
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])), key=lambda a: (isinstance(a["id"], str), a["id"]))
        if need_masks:
            for a in anns:
                if not has_segmentation(a) and not a.get("keypoints"):
                    problems.append(f"{COCO_FILE}: annotation {a['id']!r} of image {file!r} has no segmentation "
                                    "(polygons or RLE); a bbox alone draws no mask")
        instances = [(class_of[a["category_id"]], coco.annToMask(a)) for a in anns
                     if a["category_id"] in class_of and has_segmentation(a)]
        kp = None
        with_kp = [a for a in anns if has_keypoints(a)]
        if with_kp and keypoint_names is not None:
            where = f"{COCO_FILE}: annotation {with_kp[0]['id']!r} of image {file!r}"
            kp = coco_keypoints(with_kp[0], size, keypoint_names, where, problems)
        out[file] = {"size": size, "instances": instances, "keypoints": kp}
    return out


def _paint(instances: list[tuple[int, np.ndarray]], size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size[::-1], np.uint8)
    for class_id, m in instances:  # later annotations paint over earlier ones
        mask[m > 0] = class_id
    return mask


def _prompt_from(mask: np.ndarray | None, classes: list[str]) -> str:
    """"a photo of a <class> and ..." for the classes `mask` shows (the cropped labels, so no class
    the crop removed), background (id 0) left out."""
    present = [] if mask is None else [int(c) for c in np.unique(mask) if c != 0]
    if not present:
        return "a photo"
    return "a photo of " + " and ".join(f"a {classes[c]}" for c in present)


def save_real_labeled_set(path: str, s: RealLabeledSet) -> None:
    tensors = {"images": s.images}
    for name in ("masks", "depth", "instance_map", "keypoints"):
        if getattr(s, name) is not None:
            tensors[name] = getattr(s, name)
    metadata = {
        "tasks": json.dumps(s.tasks),
        "classes": json.dumps(s.classes),
        "keypoint_names": json.dumps(s.keypoint_names),
        "files": json.dumps(s.files),
        "prompts": json.dumps(s.prompts),
        "instance_classes": json.dumps(s.instance_classes),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensorfile.write(path, tensors, FORMAT, metadata)


def load_real_labeled_set(path: str) -> RealLabeledSet:
    tensors, metadata = tensorfile.read(path, FORMAT, "labeled set of real images",
                                        "the diffusion path trains on what `factory labels import` writes")
    return RealLabeledSet(
        tasks=json.loads(metadata["tasks"]), classes=json.loads(metadata["classes"]),
        keypoint_names=json.loads(metadata["keypoint_names"]), files=json.loads(metadata["files"]),
        prompts=json.loads(metadata["prompts"]), images=tensors["images"], masks=tensors.get("masks"),
        depth=tensors.get("depth"), instance_map=tensors.get("instance_map"),
        instance_classes=json.loads(metadata["instance_classes"]), keypoints=tensors.get("keypoints"),
    )
