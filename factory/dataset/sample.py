"""The sample format: one owner for what a generated sample is on disk and how it comes back.

    Sample (arrays, as the backbone and decoder made them)
      -> encode -> a SAMPLE_SCHEMA row (PNG bytes, JSON text): a Parquet row as it is written
      -> tar_members -> WebDataset members KEY.png, KEY.seg.png, KEY.depth.png, KEY.inst.png, KEY.json
    a row read back (from Parquet, or `row_from_tar` of a tar's members) -> decode -> arrays

Both shard formats hold the same rows, so every reader decodes them the same way.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("latent", pa.list_(pa.float32()), nullable=False),
        pa.field("psi", pa.float32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary()),
        pa.field("keypoints", pa.string()),
        pa.field("uncertainty", pa.float32(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("guidance", pa.float32()),
        pa.field("steps", pa.int32()),
        pa.field("depth", pa.binary()),
        pa.field("depth_scale", pa.float32()),
        pa.field("instances", pa.binary()),
        pa.field("instance_classes", pa.string()),
        pa.field("class_index", pa.int32()),
    ]
)
"""One generated sample. `image` and `mask` are PNG bytes (mask: uint8 class ids); `keypoints` is
JSON [{"name", "x", "y", "score"}]; `latent` is the z the seed produced (empty for a diffusion
backbone, whose input is `prompt`); `config_hash` identifies the backbone, decoder and sampling
settings that made the sample. Diffusion samples also record `prompt`, `guidance` and `steps`;
`depth` is a 16-bit PNG of metres x `depth_scale`; `instances` is an 8-bit PNG of instance ids
(0: none) described by `instance_classes`, JSON [{"id", "class", "score"}]. `class_index` is the
class a class-conditional GAN generated the sample for (`backbone.classes`). Fields a backbone or
decoder does not produce are null."""

MEDIA_FIELDS = ("image", "mask", "depth", "instances")
META_SCHEMA = pa.schema([f for f in SAMPLE_SCHEMA if f.name not in MEDIA_FIELDS])
"""SAMPLE_SCHEMA without the encoded pixels: what `KEY.json` holds and the Parquet beside a tar."""

TAR_MEMBERS = {"image": "png", "mask": "seg.png", "depth": "depth.png", "instances": "inst.png"}
"""Sample field -> WebDataset member extension (`KEY.png`, `KEY.seg.png`, `KEY.depth.png`,
`KEY.inst.png`; the image is `KEY.webp` or `KEY.jpg` when written with that codec); metadata is
`KEY.json`. Members a sample lacks are not written."""

JSON_FIELDS = ("keypoints", "instance_classes")
"""Fields stored as JSON text in Parquet and parsed in `KEY.json`."""
FLOAT32_FIELDS = tuple(f.name for f in META_SCHEMA if f.type == pa.float32())
"""Scalar fields stored as float32: `KEY.json` holds their float32 values too."""


@dataclass
class Sample:
    """One generated sample before encoding: pixels as arrays, labels as the decoder made them."""

    seed: int
    shard: int
    image: np.ndarray
    """[H, W, 3] uint8."""
    latent: np.ndarray
    """[z_dim] float32 (empty for a diffusion backbone)."""
    uncertainty: float
    config_hash: str
    psi: float = 0.0
    mask: np.ndarray | None = None
    """[H, W] uint8 class ids."""
    keypoints: list[dict] | None = None
    """[{"name", "x", "y", "score"}] in pixel-index units."""
    depth: np.ndarray | None = None
    """[H, W] float32 metres."""
    depth_scale: float | None = None
    instances: np.ndarray | None = None
    """[H, W] instance ids (0: none), at most 255."""
    instance_classes: list[dict] | None = None
    """[{"id", "class" (name), "score"}] for the ids in `instances`."""
    prompt: str | None = None
    guidance: float | None = None
    steps: int | None = None
    class_index: int | None = None
    """The class of a class-conditional GAN's sample (its one-hot label's index)."""

    @property
    def key(self) -> str:
        return f"{self.seed:012d}"


IMAGE_FORMATS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
"""`image` codecs -> their WebDataset member extension (`KEY.png`, `KEY.webp`, `KEY.jpg`). Labels
(mask, depth, instances) are always PNG: lossless."""


@dataclass(frozen=True)
class Codec:
    """How a sample's pixels become bytes (`generate.image_format` and friends)."""

    image_format: str = "png"
    """"png" (lossless), "webp" or "jpeg" (lossy, `quality`) for the image; labels are always PNG."""
    quality: int = 95
    """webp/jpeg quality, 1-100."""
    png_compression: int = 1
    """zlib level of every PNG, 0-9: 1 is fast and nearly as small as PIL's default 6."""


def png(array: np.ndarray, compression: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compression)
    return buf.getvalue()


def png16(depth_m: np.ndarray, scale: float, compression: int = 6) -> bytes:
    """Metres -> a 16-bit PNG of metres x scale (clipped to 1..65535; 0 stays for unknown)."""
    return png(np.clip(np.round(depth_m * scale), 1, 65535).astype(np.uint16), compression)


def encode_image(array: np.ndarray, codec: Codec) -> bytes:
    if codec.image_format == "png":
        return png(array, codec.png_compression)
    buf = io.BytesIO()
    if codec.image_format == "webp":
        Image.fromarray(array).save(buf, format="WEBP", quality=codec.quality, method=4)
    elif codec.image_format == "jpeg":
        Image.fromarray(array).save(buf, format="JPEG", quality=codec.quality)
    else:
        raise ValueError(f"image format must be one of {sorted(IMAGE_FORMATS)}, got {codec.image_format!r}")
    return buf.getvalue()


def image_extension(data: bytes) -> str:
    """The WebDataset extension of encoded image bytes, read from their signature."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    raise ValueError("image bytes are neither PNG, WebP nor JPEG")


def decode_png(data: bytes | None) -> np.ndarray | None:
    """PNG (or WebP, JPEG: whatever `image` holds) bytes -> the array; None stays None."""
    if data is None:
        return None
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


def encode(s: Sample, codec: Codec = Codec()) -> dict:
    """A Sample -> its SAMPLE_SCHEMA row: the image in `codec.image_format`, labels as PNG and JSON."""
    keypoints = None
    if s.keypoints is not None:
        keypoints = json.dumps([{"name": k["name"], "x": round(float(k["x"]), 3), "y": round(float(k["y"]), 3),
                                 "score": round(float(k["score"]), 4)} for k in s.keypoints])
    height, width = s.image.shape[:2]
    level = codec.png_compression
    return {
        "key": s.key,
        "seed": s.seed,
        "shard": s.shard,
        "latent": s.latent,
        "psi": s.psi,
        "width": width,
        "height": height,
        "image": encode_image(s.image, codec),
        "mask": png(s.mask, level) if s.mask is not None else None,
        "keypoints": keypoints,
        "uncertainty": float(s.uncertainty),
        "config_hash": s.config_hash,
        "prompt": s.prompt,
        "guidance": s.guidance,
        "steps": s.steps,
        "depth": png16(s.depth, s.depth_scale, level) if s.depth is not None else None,
        "depth_scale": s.depth_scale if s.depth is not None else None,
        "instances": png(s.instances.astype(np.uint8), level) if s.instances is not None else None,
        "instance_classes": json.dumps(s.instance_classes) if s.instance_classes is not None else None,
        "class_index": s.class_index,
    }


def metadata(row: dict) -> dict:
    """A row's META_SCHEMA fields as JSON values (`latent` as a list, JSON fields parsed): `KEY.json`."""
    meta = {name: row.get(name) for name in META_SCHEMA.names}
    for name in FLOAT32_FIELDS:  # as the Parquet columns hold them, whichever way the row came
        meta[name] = None if meta[name] is None else float(np.float32(meta[name]))
    meta["latent"] = [float(x) for x in np.asarray(meta["latent"], dtype=np.float32)]
    for name in JSON_FIELDS:
        meta[name] = json.loads(meta[name]) if meta[name] else None
    return meta


def tar_members(row: dict) -> list[tuple[str, bytes]]:
    """A row's WebDataset members in a fixed order: the pixels it has, then `KEY.json`."""
    key = row["key"]
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
    members = [(f"{key}.{image_extension(row[field]) if field == 'image' else ext}", row[field])
               for field, ext in TAR_MEMBERS.items() if row.get(field) is not None]
    return members + [(f"{key}.json", json.dumps(metadata(row), sort_keys=True).encode())]


def row_from_tar(members: dict[str, bytes]) -> dict:
    """One sample's tar members ({extension: bytes}, `json` among them) -> its row, as Parquet holds it."""
    row = json.loads(members["json"])
    for name in JSON_FIELDS:
        row[name] = json.dumps(row[name]) if row.get(name) is not None else None
    for field, ext in TAR_MEMBERS.items():
        row[field] = members.get(ext)
    for ext in IMAGE_FORMATS.values():  # the image under whichever codec made it
        row["image"] = row["image"] if row["image"] is not None else members.get(ext)
    return row


def decode(row: dict) -> dict:
    """`image` [H, W, 3] uint8, `mask` [H, W] uint8, `keypoints` list, `depth` [H, W] float32 metres,
    `instances` [H, W] uint8 ids with `instance_classes` list; each None where the dataset lacks it."""
    row["image"] = decode_png(row["image"])
    row["mask"] = decode_png(row["mask"])
    row["keypoints"] = json.loads(row["keypoints"]) if row["keypoints"] else None
    depth = decode_png(row.get("depth"))
    row["depth"] = None if depth is None else depth.astype(np.float32) / np.float32(row["depth_scale"])
    row["instances"] = decode_png(row.get("instances"))
    row["instance_classes"] = json.loads(row["instance_classes"]) if row.get("instance_classes") else None
    return row
