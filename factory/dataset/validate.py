"""Validating a finished dataset before anyone may rely on it (a nightly version before LATEST
names it): counts, completeness, checksums and label sanity."""

from __future__ import annotations

import numpy as np

from factory.dataset import layout, read


class ValidationError(RuntimeError):
    """A dataset version failed validation; the message lists every problem."""


def validate(dataset: str, min_samples: int = 1, verify_checksums: bool = True, label_samples: int = 200) -> dict:
    """Check a finished version before it may become LATEST; raises ValidationError listing every
    problem, or returns what was checked.

    Counts (the manifest's totals match its shards; at least `min_samples` kept), completeness (no
    failed shards; every listed file present with its recorded size and, with `verify_checksums`,
    its sha256), and label sanity on the first `label_samples` samples (mask ids within the label
    set and not all background; keypoints inside the image)."""
    problems: list[str] = []
    manifest = layout.read_manifest(dataset)
    counted = sum(s["count"] for s in manifest["shards"])
    if not manifest["complete"] or manifest["failed"]:
        problems.append(f"{len(manifest['failed'])} of {manifest['num_shards']} shards failed or are missing")
    if counted != manifest["num_samples"]:
        problems.append(f"manifest says {manifest['num_samples']} samples, its shards hold {counted}")
    if manifest["num_samples"] < min_samples:
        problems.append(f"{manifest['num_samples']} samples kept, fewer than the required {min_samples}")
    checked_files = 0
    for record in manifest["shards"]:
        problems += layout.verify_files(dataset, record, checksums=verify_checksums)
        checked_files += len(record["files"])
    labels = manifest["labels"]
    foreground = 0
    checked_samples = 0
    if not problems:
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
