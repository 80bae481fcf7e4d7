"""Shard writers: a shard's samples -> its files in one format, published only when complete.

Every writer has the same shape (`write(row)`, `close() -> file records`, `abort()`), a Protocol
rather than a base class. A writer fills a private local folder, and `close` uploads each file to its
final name through a temporary one (`storage.put_file`), so a reader never sees half a shard.
Rows are SAMPLE_SCHEMA rows (`factory.dataset.sample.encode`).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from factory import storage
from factory.dataset.layout import FORMATS, ShardSpec, shard_files
from factory.dataset.sample import META_SCHEMA, SAMPLE_SCHEMA, tar_members


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
    """Rows -> a tar of their members (`sample.tar_members`) plus a metadata Parquet beside it.

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
        for name, data in tar_members(sample):
            self._add(name, data)
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
        if not name or "/" in name or "\\" in name or name.startswith(".") or ".." in name:
            raise ValueError(f"tar member name {name!r} is not a plain file name")  # readers extract these
        info = tarfile.TarInfo(name)  # a regular file (REGTYPE), never a link or a folder
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        self._tar.addfile(info, io.BytesIO(data))


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
