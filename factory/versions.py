"""Versioned datasets under one root: dated versions, validation, an atomic LATEST pointer, retention.

    <root>/2026-11-23/            a finished dataset (the layout of factory/shards.py)
    <root>/2026-11-24/            tonight's build; consumers do not see it until LATEST names it
    <root>/LATEST                 {"version": "2026-11-23", ...}, replaced in one write

Consumers read `ROOT@latest`; `resolve` turns it into the version LATEST names. LATEST moves only
after a version validates, so a half-built or broken version is never the latest one.
"""

from __future__ import annotations

import datetime
import hashlib
import re

import numpy as np

from factory import shards, storage

LATEST = "LATEST"
LATEST_SUFFIX = "@latest"
VERSION_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ValidationError(RuntimeError):
    """A dataset version failed validation; the message lists every problem."""


def version_name(date: datetime.date) -> str:
    return date.isoformat()


def parse_version(name: str) -> str:
    if not VERSION_PATTERN.match(name):
        raise ValueError(f"dataset version must be a date YYYY-MM-DD, got {name!r}")
    datetime.date.fromisoformat(name)  # a real calendar date
    return name


def read_latest(root: str) -> dict | None:
    url = storage.join(root, LATEST)
    return storage.read_json(url) if storage.exists(url) else None


def resolve(url: str) -> str:
    """`ROOT@latest` -> the version folder LATEST names; any other URL unchanged."""
    if not url.endswith(LATEST_SUFFIX):
        return url
    root = url.removesuffix(LATEST_SUFFIX)
    latest = read_latest(root)
    if latest is None:
        raise FileNotFoundError(f"{root} has no {LATEST} pointer yet: no version has been published")
    return storage.join(root, latest["version"])


def set_latest(root: str, version: str, manifest: dict) -> dict:
    """Point LATEST at `version` in one atomic write; returns the pointer."""
    pointer = {
        "version": parse_version(version),
        "build_hash": manifest["build_hash"],
        "num_samples": manifest["num_samples"],
    }
    if read_latest(root) != pointer:
        storage.write_json(storage.join(root, LATEST), pointer)
    return pointer


def list_versions(root: str) -> list[str]:
    if not storage.exists(root):
        return []
    return sorted(name for name in storage.listdir(root) if VERSION_PATTERN.match(name))


def prune(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the one LATEST names; returns the deleted."""
    latest = read_latest(root)
    protected = {latest["version"]} if latest else set()
    versions = list_versions(root)
    doomed = [v for v in versions[: max(len(versions) - keep, 0)] if v not in protected]
    for version in doomed:
        storage.remove_tree(storage.join(root, version))
    return doomed


def validate(dataset: str, min_samples: int = 1, verify_checksums: bool = True, label_samples: int = 200) -> dict:
    """Check a finished version before it may become LATEST; raises ValidationError listing every
    problem, or returns what was checked.

    Counts (the manifest's totals match its shards; at least `min_samples` kept), completeness (no
    failed shards; every listed file present with its recorded size and, with `verify_checksums`,
    its sha256), and label sanity on the first `label_samples` samples (mask ids within the label
    set and not all background; keypoints inside the image)."""
    problems: list[str] = []
    manifest = shards.read_manifest(dataset)
    counted = sum(s["count"] for s in manifest["shards"])
    if not manifest["complete"] or manifest["failed"]:
        problems.append(f"{len(manifest['failed'])} of {manifest['num_shards']} shards failed or are missing")
    if counted != manifest["num_samples"]:
        problems.append(f"manifest says {manifest['num_samples']} samples, its shards hold {counted}")
    if manifest["num_samples"] < min_samples:
        problems.append(f"{manifest['num_samples']} samples kept, fewer than the required {min_samples}")
    checked_files = 0
    for record in manifest["shards"]:
        for file in record["files"]:
            url = storage.join(dataset, file["path"])
            if not storage.exists(url):
                problems.append(f"{file['path']} is missing")
                continue
            if verify_checksums:
                data = storage.read_bytes(url)
                if len(data) != file["bytes"] or hashlib.sha256(data).hexdigest() != file["sha256"]:
                    problems.append(f"{file['path']} does not match its recorded size/sha256")
            checked_files += 1
    labels = manifest["labels"]
    foreground = 0
    checked_samples = 0
    if not problems:
        from factory import read  # read resolves ROOT@latest through this module

        try:
            for sample in read.iter_samples(dataset, limit=label_samples):
                checked_samples += 1
                if sample["mask"] is not None:
                    if int(sample["mask"].max()) >= len(labels):
                        problems.append(f"sample {sample['key']}: mask id {int(sample['mask'].max())} is not a label")
                    foreground += int(np.count_nonzero(sample["mask"]))
                for kp in sample["keypoints"] or []:
                    if not (0 <= kp["x"] <= sample["width"] and 0 <= kp["y"] <= sample["height"]):
                        problems.append(f"sample {sample['key']}: keypoint {kp['name']} outside the image")
        except Exception as e:  # an unreadable shard is a validation failure, not a crash
            problems.append(f"cannot read its samples: {type(e).__name__}: {str(e).splitlines()[0]}")
        if manifest["task"] == "segmentation" and checked_samples and foreground == 0:
            problems.append(f"the first {checked_samples} masks are all background ({labels[0]})")
    if problems:
        raise ValidationError(f"{dataset} failed validation: " + "; ".join(problems[:10]))
    return {"samples": manifest["num_samples"], "files_checked": checked_files, "samples_checked": checked_samples}
