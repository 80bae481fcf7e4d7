"""The dataset layout on disk: shard plan, shard writers, completion records, manifest.

    <output>/build.json                  config hash + resolved config, written before any shard
    <output>/shards/shard-00000.parquet  one row per sample (SAMPLE_SCHEMA)
    <output>/_stats/shard-00000.json     completion record, written after the shard's data
    <output>/manifest.json               written last: shard list with counts and checksums

A shard is a fixed, contiguous seed range named from its index, so a rebuild writes the same names
and bytes. Data files are published from a temporary name; a shard counts as done only when its
completion record exists, and resume skips exactly those.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from factory import storage

SHARDS_DIR = "shards"
STATS_DIR = "_stats"
MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
FORMAT = "factory.dataset/1"

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
    ]
)
"""One generated sample. `image` and `mask` are PNG bytes (mask: uint8 class ids); `keypoints` is
JSON [{"name", "x", "y", "score"}]; `latent` is the z the seed produced; `config_hash` identifies the
backbone, decoder and sampling settings that made the sample."""


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start_seed: int
    stop_seed: int
    """Exclusive."""

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    @property
    def seeds(self) -> range:
        return range(self.start_seed, self.stop_seed)


def plan_shards(start_seed: int, num_samples: int, shard_size: int) -> list[ShardSpec]:
    stop = start_seed + num_samples
    return [
        ShardSpec(i, s, min(s + shard_size, stop))
        for i, s in enumerate(range(start_seed, stop, shard_size))
    ]


def shard_url(output: str, name: str) -> str:
    return storage.join(output, SHARDS_DIR, name)


class ParquetShardWriter:
    """Samples of one shard -> `<name>.parquet`, streamed in row groups, published by `close()`."""

    def __init__(self, output: str, shard: ShardSpec, rows_per_group: int = 64) -> None:
        self.url = shard_url(output, f"{shard.name}.parquet")
        self._dir = tempfile.mkdtemp(prefix="factory-shard-")
        self._path = os.path.join(self._dir, f"{shard.name}.parquet")
        self._writer = pq.ParquetWriter(self._path, SAMPLE_SCHEMA)
        self._rows: list[dict] = []
        self._rows_per_group = rows_per_group
        self.count = 0

    def write(self, sample: dict) -> None:
        self._rows.append(sample)
        self.count += 1
        if len(self._rows) >= self._rows_per_group:
            self._flush()

    def close(self) -> list[dict]:
        """Publish the file; returns [{path, bytes, sha256}] for the completion record."""
        self._flush()
        self._writer.close()
        try:
            record = file_record(self._path, self.url)
            storage.put_file(self._path, self.url)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        return [record]

    def abort(self) -> None:
        self._writer.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SAMPLE_SCHEMA))
            self._rows = []


def file_record(local_path: str, url: str) -> dict:
    h = hashlib.sha256()
    with open(local_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": f"{SHARDS_DIR}/{url.rsplit('/', 1)[1]}", "bytes": os.path.getsize(local_path), "sha256": h.hexdigest()}


def completion_url(output: str, shard: ShardSpec) -> str:
    return storage.join(output, STATS_DIR, f"{shard.name}.json")


def read_completion(output: str, shard: ShardSpec) -> dict | None:
    url = completion_url(output, shard)
    return storage.read_json(url) if storage.exists(url) else None


def write_completion(output: str, shard: ShardSpec, record: dict) -> None:
    storage.write_json(completion_url(output, shard), record)


def prepare_output(output: str, build_hash: str, resolved_config: dict, overwrite: bool) -> None:
    """Claim `output` for this build; refuse one started from a different config unless overwriting."""
    url = storage.join(output, BUILD_RECORD)
    if storage.exists(url):
        previous = storage.read_json(url)
        if previous.get("build_hash") == build_hash:
            return
        if not overwrite:
            raise FileExistsError(
                f"{output} holds a dataset built from a different config (build hash "
                f"{previous.get('build_hash', '?')[:12]}, this config {build_hash[:12]}); "
                "choose another generate.output or pass generate.overwrite=true"
            )
        storage.remove_tree(output)
    elif storage.exists(output) and storage.listdir(output):
        if not overwrite:
            raise FileExistsError(
                f"{output} exists and is not a factory dataset; choose another generate.output "
                "or pass generate.overwrite=true"
            )
        storage.remove_tree(output)
    storage.makedirs(storage.join(output, SHARDS_DIR))
    storage.write_json(url, {"format": FORMAT, "build_hash": build_hash, "config": resolved_config})


def write_manifest(output: str, manifest: dict) -> None:
    storage.write_json(storage.join(output, MANIFEST), manifest)


def read_manifest(output: str) -> dict:
    url = storage.join(output, MANIFEST)
    if not storage.exists(url):
        raise FileNotFoundError(f"{output} has no {MANIFEST}: not a finished factory dataset")
    manifest = storage.read_json(url)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url}: unknown dataset format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest
