"""Reading a finished dataset back: manifest, shard tables, decoded samples, and loaders for
downstream training (a PyTorch `IterableDataset` and a `ray.data.Dataset`).

Every reader takes a dataset URL (local path, file:// or s3://, or `ROOT@latest` for the newest
published version under a nightly root), reads only the shards the manifest lists as complete, in
shard order, and builds its filesystems through `factory.storage`.
"""

from __future__ import annotations

import json
import os
import tarfile
import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from factory import storage
from factory.config import StorageConfig
from factory.dataset import layout, versions
from factory.dataset.sample import decode, row_from_tar


def open_dataset(dataset: str) -> tuple[str, dict]:
    """(resolved URL, manifest) of a finished dataset; `ROOT@latest` resolves through LATEST."""
    url = versions.resolve(dataset)
    return url, layout.read_manifest(url)


def choose_format(manifest: dict, fmt: str, url: str) -> str:
    """`fmt`, checked against what the dataset holds; "auto" prefers Parquet."""
    formats = manifest["formats"]
    if fmt == "auto":
        return "parquet" if "parquet" in formats else formats[0]
    if fmt not in formats:
        raise ValueError(f"{url} was written as {', '.join(formats)}, not {fmt!r}")
    return fmt


def files_of(record: dict, suffix: str) -> list[str]:
    """A completion record's file paths (relative to the dataset) that end in `suffix`."""
    if suffix == ".parquet":
        return [f["path"] for f in record["files"] if f["path"].startswith("parquet/")]
    return [f["path"] for f in record["files"] if f["path"].endswith(suffix)]


def shard_tables(dataset: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Each complete shard's table, in shard order: the Parquet shards, or for a WebDataset-only
    dataset the metadata Parquet beside each tar (no `image`/`mask` columns there)."""
    url, manifest = open_dataset(dataset)
    for _, table in record_tables(url, manifest, columns):
        yield table


def record_tables(url: str, manifest: dict, columns: list[str] | None = None) -> Iterator[tuple[dict, pa.Table]]:
    """(completion record, table) of each complete shard of the dataset at `url`, as `shard_tables`."""
    suffix = ".parquet" if "parquet" in manifest["formats"] else ".meta.parquet"
    for record in manifest["shards"]:
        for path in files_of(record, suffix):
            fs, inner = storage.filesystem(storage.join(url, path))
            yield record, pq.read_table(inner, filesystem=fs, columns=columns)


def iter_tar(url: str, settings: StorageConfig | None = None) -> Iterator[dict]:
    """The samples of one WebDataset tar, streamed: rows with the Parquet columns (`image` and
    `mask` as PNG bytes, `keypoints` as JSON text), so both formats feed the same decoding.
    `settings`: the storage settings to read with (default: the process's)."""
    fs, path = storage.filesystem(url, settings)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        row: dict = {}
        for member in tar:
            key, _, ext = member.name.partition(".")
            if row and row["key"] != key:
                yield row_from_tar(row)
                row = {}
            row["key"] = key
            row[ext] = tar.extractfile(member).read()
        if row:
            yield row_from_tar(row)


def iter_rows(url: str, manifest: dict, fmt: str, records: list[dict],
              settings: StorageConfig | None = None) -> Iterator[dict]:
    """Undecoded sample rows of the given shards, in order, from one format, read with `settings`
    (default: the process's storage settings)."""
    for record in records:
        if fmt == "parquet":
            for path in files_of(record, ".parquet"):
                fs, inner = storage.filesystem(storage.join(url, path), settings)
                with fs.open(inner, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                        yield from batch.to_pylist()
        else:
            for path in files_of(record, ".tar"):
                yield from iter_tar(storage.join(url, path), settings)


def iter_samples(dataset: str, limit: int | None = None, fmt: str = "auto",
                 manifest: dict | None = None) -> Iterator[dict]:
    """Decoded samples in shard order, from either format (see `decode`). A build passes the
    `manifest` it is about to publish, to read its shards before that (the card and preview)."""
    url, manifest = (dataset, manifest) if manifest is not None else open_dataset(dataset)
    fmt = choose_format(manifest, fmt, url)
    for n, row in enumerate(iter_rows(url, manifest, fmt, manifest["shards"])):
        if limit is not None and n >= limit:
            return
        yield decode(row)


def reader_range(n: int, rank: int, world_size: int, worker: int, workers: int) -> tuple[int, int]:
    """The [start, stop) positions one reader takes of `n` samples in the epoch's order: every rank
    the same number, n // world_size, in one contiguous run (the last n % world_size samples sit
    out the epoch, as with DistributedSampler(drop_last=True): DDP ranks must take the same number
    of steps, or the ranks with more wait forever in an all-reduce); a rank's DataLoader workers
    split its run, their counts differing by at most one. Runs are contiguous, so a reader reads
    whole shards but for at most two at its run's ends."""
    per_rank = n // world_size
    first = rank * per_rank
    return first + worker * per_rank // workers, first + (worker + 1) * per_rank // workers


TARGETS = ("auto", "mask", "keypoints", "depth", "instances")
"""What `ShardDataset` yields as a sample's target."""


class ShardDataset(IterableDataset):
    """A PyTorch `IterableDataset` over a dataset URL for downstream training.

    Yields `(image, target, meta)`: image a uint8 tensor [3, H, W]; target by `target`: `"mask"`, the
    class-id mask as an int64 tensor [H, W]; `"keypoints"`, a float32 tensor [K, 3] of (x, y, score);
    `"depth"`, a float32 tensor [H, W] in metres; `"instances"`, the instance-id map as an int64
    tensor [H, W] (its classes are in meta as `instance_classes`, JSON); `"auto"` (default), the
    mask where the dataset has masks, else the keypoints. meta is a dict of scalars (key, seed,
    shard, uncertainty, config_hash, and the prompt for diffusion datasets) that DataLoader's
    default collate batches.

    The epoch's samples (those scoring at most `max_uncertainty`, when given) are split across
    distributed ranks and DataLoader workers without overlap, every rank the same number, in
    contiguous runs of the shard order (see `reader_range`; the scores of a filtered dataset are
    read once, here, to count what each shard keeps). Rank and world size default to
    torch.distributed's when it is initialized, else to the RANK and WORLD_SIZE environment
    variables, else 0 and 1. `shuffle` permutes the shard order with (seed, epoch); call
    `set_epoch` each epoch.
    """

    def __init__(
        self,
        url: str,
        format: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        storage_cfg: StorageConfig | None = None,
        max_uncertainty: float | None = None,
        shuffle: bool = False,
        seed: int = 0,
        target: str = "auto",
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.target = target
        self.storage_cfg = storage_cfg or storage.current()  # this reader's own: others may read elsewhere
        with storage.configured(self.storage_cfg):
            self.url, self.manifest = open_dataset(url)
            self.format = choose_format(self.manifest, format, self.url)
            self.kept = kept_counts(self.url, self.manifest, max_uncertainty)
        self.rank, self.world_size = _distributed(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        self.max_uncertainty, self.shuffle, self.seed = max_uncertainty, shuffle, seed
        # shared memory: DataLoader workers that persist across epochs see set_epoch too
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        total = sum(self.kept.values())
        if total < self.world_size:  # every rank takes total // world_size samples: none
            kept = f" scoring at most max_uncertainty={max_uncertainty}" if max_uncertainty is not None else ""
            warnings.warn(f"{self.url}: {total} samples{kept} for {self.world_size} ranks: every rank reads "
                          "none (ranks take equal shares)", stacklevel=2)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def shard_order(self) -> list[dict]:
        records = list(self.manifest["shards"])
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(records))
            records = [records[i] for i in order]
        return records

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        records = self.shard_order()
        counts = [self.kept[r["name"]] for r in records]
        start, stop = reader_range(sum(counts), self.rank, self.world_size, worker, workers)
        offsets = np.cumsum([0] + counts)
        for record, offset, count in zip(records, offsets, counts):
            if offset + count <= start or offset >= stop:
                continue
            position = offset  # of the next kept sample in the epoch's order
            for row in iter_rows(self.url, self.manifest, self.format, [record], self.storage_cfg):
                if self.max_uncertainty is not None and row["uncertainty"] > self.max_uncertainty:
                    continue
                position += 1
                if not start < position <= stop:
                    continue
                sample = decode(row)
                image = torch.from_numpy(sample["image"]).permute(2, 0, 1).contiguous()
                meta = {k: sample[k] for k in ("key", "seed", "shard", "uncertainty", "config_hash")}
                if sample.get("prompt") is not None:
                    meta["prompt"] = sample["prompt"]
                if self.target == "instances":
                    meta["instance_classes"] = json.dumps(sample["instance_classes"])
                yield image, self._target(sample), meta

    def _target(self, sample: dict) -> torch.Tensor:
        kind = self.target
        if kind == "auto":
            kind = "mask" if sample["mask"] is not None else "keypoints"
        value = sample[kind]
        if value is None:
            raise ValueError(f"{self.url}: sample {sample['key']!r} has no {kind} (ShardDataset target={self.target!r}; "
                             f"the dataset's tasks are {self.manifest.get('tasks') or self.manifest.get('task')})")
        if kind == "keypoints":
            return torch.tensor([[k["x"], k["y"], k["score"]] for k in value], dtype=torch.float32)
        if kind == "depth":
            return torch.from_numpy(value)
        return torch.from_numpy(value.astype(np.int64))


def kept_counts(url: str, manifest: dict, max_uncertainty: float | None) -> dict[str, int]:
    """Each shard's number of samples scoring at most `max_uncertainty` (all of them for None): its
    completion record's count, or, filtering, from its scores alone (the Parquet shard's
    `uncertainty` column, or the `.meta.parquet` beside a tar), one read per shard."""
    if max_uncertainty is None:
        return {r["name"]: r["count"] for r in manifest["shards"]}
    kept = dict.fromkeys((r["name"] for r in manifest["shards"]), 0)
    for record, table in record_tables(url, manifest, ["uncertainty"]):
        scores = table.column("uncertainty").to_numpy().astype(np.float64)  # compared as each row is, in float64
        kept[record["name"]] += int(np.count_nonzero(scores <= max_uncertainty))
    return kept


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def ray_dataset(url: str, format: str = "parquet", storage_cfg: StorageConfig | None = None):
    """The dataset as a `ray.data.Dataset` for Ray Train consumers: the Parquet shards through
    `read_parquet` (one row per sample, the Parquet columns) or the tars through `read_webdataset`,
    on the pyarrow filesystem built from the storage settings, so an S3 endpoint reaches Ray's
    workers too."""
    import ray

    if storage_cfg is not None:
        storage.configure(storage_cfg)
    resolved, manifest = open_dataset(url)
    fmt = choose_format(manifest, format, resolved)
    suffix = ".parquet" if fmt == "parquet" else ".tar"
    fs, root = storage.arrow_filesystem(resolved)
    paths = [f"{root}/{p}" for r in manifest["shards"] for p in files_of(r, suffix)]
    if fmt == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs)
    return ray.data.read_webdataset(paths, filesystem=fs, decoder=None)
