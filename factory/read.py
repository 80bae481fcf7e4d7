"""Reading a finished dataset back: its manifest, shard tables and decoded samples."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from factory import shards, storage


def shard_tables(dataset: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Each complete shard's Parquet table, in shard order."""
    manifest = shards.read_manifest(dataset)
    suffix = ".meta.parquet" if "parquet" not in manifest["formats"] else ".parquet"
    for record in manifest["shards"]:
        for file in record["files"]:
            if file["path"].startswith(suffix == ".parquet" and "parquet/" or "webdataset/") and file["path"].endswith(suffix):
                fs, path = storage.filesystem(storage.join(dataset, file["path"]))
                yield pq.read_table(path, filesystem=fs, columns=columns)


def decode_png(data: bytes | None) -> np.ndarray | None:
    if data is None:
        return None
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


def iter_samples(dataset: str, limit: int | None = None) -> Iterator[dict]:
    """Decoded samples: `image` [H, W, 3] uint8, `mask` [H, W] uint8 or None, `keypoints` list or None."""
    n = 0
    for table in shard_tables(dataset):
        for row in table.to_pylist():
            if limit is not None and n >= limit:
                return
            row["image"] = decode_png(row["image"])
            row["mask"] = decode_png(row["mask"])
            row["keypoints"] = json.loads(row["keypoints"]) if row["keypoints"] else None
            n += 1
            yield row
