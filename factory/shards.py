"""The dataset layout: shard plan, shard writers (Parquet, WebDataset), completion records, manifest.

    <output>/build.json                           config hash + resolved config, written before any shard
    <output>/calibration.json                     uncertainty threshold fixed before the build (if filtering)
    <output>/parquet/shard-00000.parquet          format "parquet": one row per sample (SAMPLE_SCHEMA)
    <output>/webdataset/shard-00000.tar           format "webdataset": KEY.png, KEY.seg.png, KEY.json
    <output>/webdataset/shard-00000.meta.parquet  beside each tar: its samples' metadata (META_SCHEMA)
    <output>/_stats/shard-00000.json              completion record, written after the shard's data
    <output>/manifest.json                        written last: shard list with counts and checksums

A shard is a fixed, contiguous seed range named from its index, so a rebuild writes the same names
and bytes (tar members carry fixed mtimes and owners, in sample order). Data files are published from
a temporary name; a shard counts as done only when its completion record exists, and resume skips
exactly those.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from factory import storage

STATS_DIR = "_stats"
MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
CALIBRATION = "calibration.json"
FORMAT = "factory.dataset/1"
PRE_BUILD_FILES = {"prompts.jsonl", "prompts.request.json"}
"""Files `factory prompts expand` may write into an output before its build starts."""
FORMATS = ("parquet", "webdataset")
"""Output formats, each written to the folder of its name."""

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
    ]
)
"""One generated sample. `image` and `mask` are PNG bytes (mask: uint8 class ids); `keypoints` is
JSON [{"name", "x", "y", "score"}]; `latent` is the z the seed produced (empty for a diffusion
backbone, whose input is `prompt`); `config_hash` identifies the backbone, decoder and sampling
settings that made the sample. Diffusion samples also record `prompt`, `guidance` and `steps`;
`depth` is a 16-bit PNG of metres x `depth_scale`; `instances` is an 8-bit PNG of instance ids
(0: none) described by `instance_classes`, JSON [{"id", "class", "score"}]. Fields a backbone or
decoder does not produce are null."""

MEDIA_FIELDS = ("image", "mask", "depth", "instances")
META_SCHEMA = pa.schema([f for f in SAMPLE_SCHEMA if f.name not in MEDIA_FIELDS])
"""SAMPLE_SCHEMA without the encoded pixels: what `KEY.json` holds and the Parquet beside a tar."""

TAR_MEMBERS = {"image": "png", "mask": "seg.png", "depth": "depth.png", "instances": "inst.png"}
"""Sample field -> WebDataset member extension (`KEY.png`, `KEY.seg.png`, `KEY.depth.png`,
`KEY.inst.png`); metadata is `KEY.json`. Members a sample lacks are not written."""


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


def shard_files(shard: ShardSpec, fmt: str) -> list[str]:
    """Paths (relative to the dataset root) that format `fmt` writes for `shard`."""
    if fmt == "parquet":
        return [f"parquet/{shard.name}.parquet"]
    if fmt == "webdataset":
        return [f"webdataset/{shard.name}.tar", f"webdataset/{shard.name}.meta.parquet"]
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


class ShardWriter(Protocol):
    """Samples of one shard -> files under temporary names; `close` publishes them."""

    def write(self, sample: dict) -> None: ...
    def close(self) -> list[dict]: ...
    def abort(self) -> None: ...


class _LocalStaging:
    """A private local folder a writer fills before its files are uploaded under their final names."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="factory-shard-")

    def publish(self, output: str, relpath: str) -> dict:
        local = os.path.join(self.dir, os.path.basename(relpath))
        record = file_record(local, relpath)
        storage.put_file(local, storage.join(output, relpath))
        return record

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ParquetShardWriter:
    """Rows of `schema` -> one Parquet file at `relpath`, streamed in row groups."""

    def __init__(self, output: str, relpath: str, schema: pa.Schema = SAMPLE_SCHEMA, rows_per_group: int = 64) -> None:
        self.output, self.relpath, self.schema = output, relpath, schema
        self._staging = _LocalStaging()
        self._writer = pq.ParquetWriter(os.path.join(self._staging.dir, os.path.basename(relpath)), schema)
        self._rows: list[dict] = []
        self._rows_per_group = rows_per_group
        self.count = 0

    def write(self, sample: dict) -> None:
        self._rows.append({name: sample.get(name) for name in self.schema.names})  # absent = null
        self.count += 1
        if len(self._rows) >= self._rows_per_group:
            self._flush()

    def close(self) -> list[dict]:
        """Publish the file; returns [{path, bytes, sha256}] for the completion record."""
        try:
            self._flush()
            self._writer.close()
            return [self._staging.publish(self.output, self.relpath)]
        finally:
            self._staging.remove()

    def abort(self) -> None:
        self._writer.close()
        self._staging.remove()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []


class WebDatasetShardWriter:
    """Samples -> a tar of `KEY.png`, `KEY.seg.png`, `KEY.json` plus a metadata Parquet beside it.

    Members are written in sample order with mtime 0, owner root and mode 0644 (USTAR), so the tar's
    bytes depend on the samples alone.
    """

    def __init__(self, output: str, shard: ShardSpec) -> None:
        tar_path, meta_path = shard_files(shard, "webdataset")
        self.output, self.relpath = output, tar_path
        self._staging = _LocalStaging()
        self._tar = tarfile.open(os.path.join(self._staging.dir, os.path.basename(tar_path)), "w",
                                 format=tarfile.USTAR_FORMAT)
        self._meta = ParquetShardWriter(output, meta_path, META_SCHEMA)
        self.count = 0

    def write(self, sample: dict) -> None:
        key = sample["key"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
        for field, ext in TAR_MEMBERS.items():
            if sample.get(field) is not None:
                self._add(f"{key}.{ext}", sample[field])
        self._add(f"{key}.json", json.dumps(sample_metadata(sample), sort_keys=True).encode())
        self._meta.write(sample)
        self.count += 1

    def close(self) -> list[dict]:
        try:
            self._tar.close()
            files = [self._staging.publish(self.output, self.relpath)]
        except BaseException:
            self._meta.abort()
            raise
        finally:
            self._staging.remove()
        return files + self._meta.close()

    def abort(self) -> None:
        self._tar.close()
        self._staging.remove()
        self._meta.abort()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        self._tar.addfile(info, io.BytesIO(data))


def sample_metadata(sample: dict) -> dict:
    """A sample's META_SCHEMA fields as JSON values (`latent` as a list, `keypoints` parsed)."""
    meta = {name: sample.get(name) for name in META_SCHEMA.names}
    meta["latent"] = [float(x) for x in meta["latent"]]
    meta["keypoints"] = json.loads(meta["keypoints"]) if meta["keypoints"] else None
    meta["instance_classes"] = json.loads(meta["instance_classes"]) if meta["instance_classes"] else None
    return meta


def open_writers(output: str, shard: ShardSpec, formats: list[str]) -> list[ShardWriter]:
    writers: list[ShardWriter] = []
    for fmt in formats:
        if fmt == "parquet":
            writers.append(ParquetShardWriter(output, shard_files(shard, fmt)[0]))
        elif fmt == "webdataset":
            writers.append(WebDatasetShardWriter(output, shard))
        else:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return writers


def file_record(local_path: str, relpath: str) -> dict:
    h = hashlib.sha256()
    with open(local_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": relpath, "bytes": os.path.getsize(local_path), "sha256": h.hexdigest()}


def completion_url(output: str, shard: ShardSpec) -> str:
    return storage.join(output, STATS_DIR, f"{shard.name}.json")


def read_completion(output: str, shard: ShardSpec) -> dict | None:
    url = completion_url(output, shard)
    return storage.read_json(url) if storage.exists(url) else None


def read_completions(output: str) -> dict[str, dict]:
    """Every completion record under `output`, by shard name, from one listing of `_stats/`."""
    url = storage.join(output, STATS_DIR)
    if not storage.exists(url):
        return {}
    return {
        name.removesuffix(".json"): storage.read_json(storage.join(url, name))
        for name in sorted(storage.listdir(url))
        if name.startswith("shard-") and name.endswith(".json")
    }


def remove_temporaries(output: str) -> list[str]:
    """Delete what an interrupted build left under temporary names; returns their paths.

    Only one build may write to an output at a time, so any temporary found at start-up is debris.
    """
    removed = []
    for folder in (*FORMATS, STATS_DIR):
        url = storage.join(output, folder)
        if storage.exists(url):
            for name in storage.listdir(url):
                if name.startswith(storage.TEMPORARY_PREFIX):
                    storage.remove_tree(storage.join(url, name))
                    removed.append(f"{folder}/{name}")
    return removed


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
    elif storage.exists(output) and set(storage.listdir(output)) - PRE_BUILD_FILES:
        if not overwrite:
            raise FileExistsError(
                f"{output} exists and is not a factory dataset; choose another generate.output "
                "or pass generate.overwrite=true"
            )
        storage.remove_tree(output)
    storage.makedirs(output)
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
