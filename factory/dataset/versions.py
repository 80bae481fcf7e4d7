"""Versioned datasets under one root: dated versions, validation, an atomic LATEST pointer, retention.

    <root>/2026-11-23/            a finished dataset (the layout of factory/dataset/layout.py)
    <root>/2026-11-24/            tonight's build; consumers do not see it until LATEST names it
    <root>/LATEST                 {"version": "2026-11-23", ...}, replaced in one write

Consumers read `ROOT@latest`; `resolve` turns it into the version LATEST names. LATEST moves only
after a version validates (`factory.dataset.validate`), so a half-built or broken version is never
the latest one.
"""

from __future__ import annotations

import datetime
import re

from factory import storage

LATEST = "LATEST"
LATEST_SUFFIX = "@latest"
VERSION_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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
    if not root.strip("/"):
        raise ValueError(f"{url!r} names no root: give ROOT{LATEST_SUFFIX}, the nightly.root the versions are "
                         f"published under (e.g. s3://bucket/datasets{LATEST_SUFFIX})")
    latest = read_latest(root)
    if latest is None:
        raise FileNotFoundError(f"{root} has no {LATEST} pointer yet: no version has been published")
    return storage.join(root, latest["version"])


def set_latest(root: str, version: str, manifest: dict) -> dict:
    """Point LATEST at `version` in one atomic write, unless it names a newer version (a backfilled
    older night is published beside it, never in its place); returns the pointer LATEST holds."""
    pointer = {
        "version": parse_version(version),
        "build_hash": manifest["build_hash"],
        "num_samples": manifest["num_samples"],
    }
    current = read_latest(root)
    if current is not None and current["version"] > pointer["version"]:  # ISO dates order as strings
        return current
    if current != pointer:
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
