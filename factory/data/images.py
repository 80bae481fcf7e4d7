"""Images as every loader of the factory reads them: which files count as images, how any file
becomes upright 8-bit RGB, and how any size becomes the square a backbone works at."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
"""File types read as images (any case)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB the way a viewer shows it: turned upright by its EXIF orientation (a
    camera stores a portrait photo sideways; its labels are drawn on the upright one), and 16-bit
    grey scaled to 8 bits (`convert("RGB")` clips 16-bit values, so a photo would turn white)."""
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG")
    image = ImageOps.exif_transpose(image)
    if sixteen_bit:
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


def square(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the short side to `size`, then centre-crop to size x size."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), resample=resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_float(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, R, R, 3] uint8 -> [B, 3, R, R] float in [-1, 1]."""
    return torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
