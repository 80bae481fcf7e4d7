"""The preview picture of a dataset: a grid of its first samples with their labels overlaid and a
class legend. Drawn at the end of a build (the dataset card shows it) and by `factory inspect`."""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

TILE = 128
PREVIEW = "preview.png"
"""Where a finished build puts its preview, relative to the dataset root."""


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: distinct, stable colours for class ids 0..n-1 (0 is black)."""
    colors = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors[i] = (r, g, b)
    return colors


def legend_color(colors: np.ndarray, index: int, task: str) -> tuple[int, int, int]:
    """Class `index`'s colour (segmentation), or keypoint `index`'s (keypoints start at colour 1)."""
    i = index if task == "segmentation" else (index + 1) % len(colors)
    return tuple(int(c) for c in colors[i])


def tile(sample: dict, colors: np.ndarray) -> Image.Image:
    """image | image with its mask tinted and keypoints dotted (| inverse depth, near bright)."""
    image = sample["image"]
    overlay = image.copy()
    if sample["mask"] is not None:  # class 0 (background) is left untinted
        tinted = (0.4 * image + 0.6 * colors[sample["mask"]]).astype(np.uint8)
        overlay = np.where(sample["mask"][..., None] > 0, tinted, image)
    panels = [image, overlay]
    if sample.get("depth") is not None:  # inverse depth, normalised per image: near is bright
        inverse = 1.0 / np.maximum(sample["depth"], 1e-3)
        span = max(float(inverse.max() - inverse.min()), 1e-6)
        grey = ((inverse - inverse.min()) / span * 255).astype(np.uint8)
        panels.append(np.repeat(grey[..., None], 3, axis=2))
    pair = Image.fromarray(np.concatenate(panels, axis=1)).resize((len(panels) * TILE, TILE), Image.NEAREST)
    if sample["keypoints"]:
        draw = ImageDraw.Draw(pair)
        scale = TILE / image.shape[1]
        for i, kp in enumerate(sample["keypoints"]):
            x, y = TILE + kp["x"] * scale, kp["y"] * scale
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=tuple(int(c) for c in colors[(i + 1) % len(colors)]))
    return pair


def draw(samples: Iterable[dict], labels: list[str], task: str, columns: int = 4) -> bytes:
    """The preview grid of `samples` (decoded, see `sample.decode`) with a legend of `labels`, as PNG."""
    colors = palette(max(len(labels), 2))
    tiles = [tile(s, colors) for s in samples]
    rows = max(1, -(-len(tiles) // columns))
    legend_h = 18 * (-(-len(labels) // 4)) + 8
    tile_w = tiles[0].width if tiles else 2 * TILE
    grid = Image.new("RGB", (columns * (tile_w + 4), rows * (TILE + 4) + legend_h), (255, 255, 255))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % columns) * (tile_w + 4), (i // columns) * (TILE + 4)))
    pen = ImageDraw.Draw(grid)
    top = rows * (TILE + 4) + 4
    for i, name in enumerate(labels):
        x, y = (i % 4) * (grid.width // 4) + 4, top + (i // 4) * 18
        pen.rectangle([x, y, x + 12, y + 12], fill=legend_color(colors, i, task), outline=(0, 0, 0))
        pen.text((x + 18, y), f"{i}: {name}", fill=(0, 0, 0))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()
