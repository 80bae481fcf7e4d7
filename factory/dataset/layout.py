"""The dataset layout: where each file of a dataset lives, the shard plan, records and manifest.

    <output>/build.json                           config hash + resolved config, written before any shard
    <output>/calibration.json                     uncertainty threshold fixed before the build (if filtering)
    <output>/parquet/shard-00000.parquet          format "parquet": one row per sample (SAMPLE_SCHEMA)
    <output>/webdataset/shard-00000.tar           format "webdataset": KEY.png, KEY.seg.png, KEY.json
    <output>/webdataset/shard-00000.meta.parquet  beside each tar: its samples' metadata (META_SCHEMA)
    <output>/_stats/shard-00000.json              completion record, written after the shard's data
    <output>/_staging/shard-00000.parquet (+.json) a calibration shard made before the threshold (transient)
    <output>/manifest.json                        written last: shard list with counts and checksums

A shard is a fixed, contiguous seed range named from its index, so a rebuild writes the same names
and bytes (tar members carry fixed mtimes and owners, in sample order). Data files are published from
a temporary name; a shard counts as done only when its completion record exists, and resume skips
exactly those. The files' contents: `sample.py` (rows), `writers.py` (shard files).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from factory import storage
from factory.lease import LEASE_FILE

STATS_DIR = "_stats"
STAGING_DIR = "_staging"
"""Calibration shards made before the uncertainty threshold exists: not part of the dataset; each is
finished into its shard once the threshold is fixed, then removed."""
MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
CALIBRATION = "calibration.json"
FORMAT = "factory.dataset/1"
PRE_BUILD_FILES = {"prompts.jsonl", "prompts.request.json", LEASE_FILE}
"""Files `factory prompts expand` may write into an output before its build starts, and the build's
own lease (`factory/lease.py`), taken before the output is claimed."""
FORMATS = ("parquet", "webdataset")
"""Output formats, each written to the folder of its name."""

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


def completion_record(spec: ShardSpec, scores: list[float], kept: int, files: list[dict], config_hash: str,
                      timings: dict[str, float]) -> dict:
    """What a finished shard records (`_stats/<shard>.json`): its seeds, counts, files with sizes and
    sha256, the uncertainty of every generated sample in summary, and timings."""
    u = np.asarray(scores, dtype=np.float64)
    return {
        "shard": spec.index,
        "name": spec.name,
        "start_seed": spec.start_seed,
        "stop_seed": spec.stop_seed,
        "generated": len(scores),
        "dropped": len(scores) - kept,
        "count": kept,
        "files": files,
        "bytes": sum(f["bytes"] for f in files),
        "uncertainty": {
            "mean": float(u.mean()), "min": float(u.min()), "max": float(u.max()),
            "p90": float(np.quantile(u, 0.9)),
        },
        "config_hash": config_hash,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def staged_file(shard: ShardSpec) -> str:
    """Where the calibration pass stages `shard`'s unfiltered rows (relative to the dataset root)."""
    return f"{STAGING_DIR}/{shard.name}.parquet"


def write_staged(output: str, shard: ShardSpec, record: dict) -> None:
    """The staged shard's record (its scores), written after its rows: it marks them complete."""
    storage.write_json(storage.join(output, STAGING_DIR, f"{shard.name}.json"), record)


def read_staged(output: str, shard: ShardSpec) -> dict | None:
    url = storage.join(output, STAGING_DIR, f"{shard.name}.json")
    return storage.read_json(url) if storage.exists(url) else None


def read_all_staged(output: str) -> dict[str, dict]:
    """Every staged shard's record, by shard name, from one listing of `_staging/`."""
    url = storage.join(output, STAGING_DIR)
    if not storage.exists(url):
        return {}
    return {name.removesuffix(".json"): storage.read_json(storage.join(url, name))
            for name in sorted(storage.listdir(url)) if name.startswith("shard-") and name.endswith(".json")}


def remove_staged(output: str, shard: ShardSpec) -> None:
    """Record first, so a crash in between leaves rows without a record: debris, never a half shard."""
    for name in (f"{shard.name}.json", f"{shard.name}.parquet"):
        storage.remove_tree(storage.join(output, STAGING_DIR, name))


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
    for folder in (*FORMATS, STATS_DIR, STAGING_DIR):
        url = storage.join(output, folder)
        if storage.exists(url):
            for name in storage.listdir(url):
                if name.startswith(storage.TEMPORARY_PREFIX):
                    storage.remove_tree(storage.join(url, name))
                    removed.append(f"{folder}/{name}")
    return removed


def escapes(path: str) -> bool:
    """Whether a file path read from a record or manifest leaves the dataset folder (absolute, `..`)."""
    return not path or path.startswith("/") or "\\" in path or ":" in path or ".." in path.split("/")


def verify_files(output: str, record: dict, checksums: bool = True) -> list[str]:
    """What is wrong with the files a completion record lists (each problem names its file): missing,
    a size other than recorded, or (`checksums`) other bytes than recorded. Empty when all match."""
    problems = []
    for file in record.get("files", []):
        if escapes(file["path"]):
            problems.append(f"{file['path']} escapes the dataset folder")
            continue
        url = storage.join(output, file["path"])
        if not storage.exists(url):
            problems.append(f"{file['path']} is missing")
            continue
        if checksums:
            size, sha = storage.digest(url)
        else:
            fs, path = storage.filesystem(url)
            size, sha = fs.size(path), file["sha256"]
        if size != file["bytes"]:
            problems.append(f"{file['path']} has {size} bytes, its record says {file['bytes']} (truncated or replaced)")
        elif sha != file["sha256"]:
            problems.append(f"{file['path']} does not match its recorded sha256 (corrupted)")
    return problems


def drop_broken(output: str, records: dict[str, dict]) -> dict[str, list[str]]:
    """Verify every completed shard's files; a shard whose files do not match loses its completion
    record (and the dataset its manifest), so the build makes it again. Returns the problems by shard."""
    broken = {name: problems for name, record in records.items() if (problems := verify_files(output, record))}
    if broken:
        storage.remove_tree(storage.join(output, MANIFEST))  # manifest first: it claims the shard is fine
        for name in broken:
            storage.remove_tree(storage.join(output, STATS_DIR, f"{name}.json"))
    return broken


def write_completion(output: str, shard: ShardSpec, record: dict) -> None:
    storage.write_json(completion_url(output, shard), record)


def prepare_output(output: str, build_hash: str, resolved_config: dict, overwrite: bool) -> None:
    """Claim `output` for this build; refuse one started from a different config unless overwriting.
    A folder that is not a factory dataset is never cleared, overwrite or not: it may be anything."""
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
        _clear(output)
    elif storage.exists(output) and set(storage.listdir(output)) - PRE_BUILD_FILES:
        found = sorted(set(storage.listdir(output)) - PRE_BUILD_FILES)
        raise FileExistsError(
            f"{output} exists and is not a factory dataset (it holds {', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}; no {BUILD_RECORD}); choose another generate.output "
            "(generate.overwrite replaces only a factory dataset, never another folder)"
        )
    storage.makedirs(output)
    storage.write_json(url, {"format": FORMAT, "build_hash": build_hash, "config": resolved_config})


def _clear(output: str) -> None:
    """Remove everything under `output` but the lease this build holds on it."""
    for name in storage.listdir(output):
        if name != LEASE_FILE:
            storage.remove_tree(storage.join(output, name))


def write_manifest(output: str, manifest: dict) -> None:
    storage.write_json(storage.join(output, MANIFEST), manifest)


def read_manifest(output: str) -> dict:
    url = storage.join(output, MANIFEST)
    if not storage.exists(url):
        storage.require_location(output)  # a missing folder or bucket is named as such
        raise FileNotFoundError(f"{output} has no {MANIFEST}: not a finished factory dataset")
    manifest = storage.read_json(url)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url}: unknown dataset format {manifest.get('format')!r}, expected {FORMAT}")
    for record in manifest.get("shards", []):
        for file in record.get("files", []):
            if escapes(file.get("path", "")):
                raise ValueError(f"{url}: file path {file.get('path')!r} escapes the dataset folder")
    return manifest


def task_labels(manifest: dict) -> list[str]:
    """The names of what a dataset's main task (`manifest["task"]`) labels: its keypoints for a
    keypoints dataset, else its classes. (A manifest without `keypoints`, written before they were
    recorded apart, holds an interpreter's keypoints as its labels.)"""
    if manifest["task"] == "keypoints":
        return manifest.get("keypoints") or manifest["labels"]
    return manifest["labels"]


def build_manifest(plan: list[ShardSpec], records: dict[str, dict], failed: dict[str, str], **fields) -> dict:
    """The manifest of a build whose plan is `plan`: every complete shard's record in plan order,
    totals over them, and each missing shard with its error (`failed`, else "not built"). `fields`
    (name, build and config hashes, labels, formats, calibration, resolved config...) are recorded
    as given."""
    done = [records[s.name] for s in plan if s.name in records]
    return {
        "format": FORMAT,
        **fields,
        "num_samples": sum(r["count"] for r in done),
        "num_generated": sum(r["generated"] for r in done),
        "num_shards": len(plan),
        "complete": len(done) == len(plan),
        "shards": done,
        "failed": [{"shard": s.index, "name": s.name, "error": failed.get(s.name, "not built")}
                   for s in plan if s.name not in records],
    }
