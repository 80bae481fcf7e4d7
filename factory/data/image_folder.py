"""A folder of training images (for `factory pretrain`): every image squared to the backbone's
resolution, with an optional prompt per image, every bad file named."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from factory.data.images import IMAGE_EXTENSIONS, square, to_rgb
from factory.data.labeled_photos import IMAGES_DIR, read_prompts
from factory.fingerprint import tensors_hash


class ImageFolderError(ValueError):
    """The training folder is missing, empty or holds bad files; `problems` lists each with its file."""

    def __init__(self, directory: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{directory}: {len(problems)} problem(s) with the training images:\n{lines}")


@dataclass
class ImageFolder:
    files: list[str]
    prompts: list[str]
    """One per image; "" where prompts.jsonl has no row for it."""
    images: np.ndarray
    """[N, R, R, 3] uint8 at the backbone's resolution."""

    @property
    def content_hash(self) -> str:
        """Identifies the training data as the model sees it (decoded pixels, names, prompts)."""
        return tensors_hash({"images": torch.from_numpy(self.images)},
                            {"files": json.dumps(self.files), "prompts": json.dumps(self.prompts)})


def load_image_folder(directory: str, resolution: int) -> ImageFolder:
    """Every image in `directory` (or its images/ folder), squared to `resolution`, with its prompt.
    Raises ImageFolderError listing every unreadable image and bad prompt row."""
    if not os.path.isdir(directory):
        raise ImageFolderError(directory, ["not a folder (pretrain.images)"])
    image_dir = os.path.join(directory, IMAGES_DIR)
    image_dir = image_dir if os.path.isdir(image_dir) else directory
    names = sorted(n for n in os.listdir(image_dir) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not names:
        raise ImageFolderError(directory, [f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}"])
    problems: list[str] = []
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(image_dir, name)) as im:
                images.append(np.array(square(to_rgb(im), resolution, Image.Resampling.BICUBIC)))
        except (OSError, Image.DecompressionBombError) as e:
            problems.append(f"{os.path.relpath(os.path.join(image_dir, name), directory)}: not a readable image ({e})")
    prompts = read_prompts(directory, names, None, problems)
    if problems:
        raise ImageFolderError(directory, problems)
    return ImageFolder(names, [prompts.get(n, "") for n in names], np.stack(images))
