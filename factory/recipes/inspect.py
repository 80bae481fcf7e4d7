"""`factory inspect`: what a dataset holds, in numbers and in one picture a person can check."""

from __future__ import annotations

import numpy as np

from factory import storage
from factory.dataset import layout, read
from factory.dataset import preview as preview_lib
from factory.dataset.card import filter_sentence
from factory.dataset.stats import label_statistics, score_histogram


def summarize(dataset: str, stat_samples: int = 2000, checksums: bool = True) -> dict:
    """Manifest summary, failed shards, files missing or not matching their records (sizes, and sha256
    with `checksums`), uncertainty histogram (all samples), label statistics (pixel frequencies per
    class, or keypoint scores) over the first `stat_samples` samples; no samples are read from a
    dataset with broken files. A build with no manifest yet (running or interrupted) gets a progress
    summary."""
    if not storage.exists(storage.join(dataset, layout.MANIFEST)) and storage.exists(
            storage.join(dataset, layout.BUILD_RECORD)):
        return progress(dataset)
    manifest = layout.read_manifest(dataset)
    labels = manifest["labels"]
    problems = [p for record in manifest["shards"] for p in layout.verify_files(dataset, record, checksums)]
    missing = [p.removesuffix(" is missing") for p in problems if p.endswith(" is missing")]
    broken = [p for p in problems if not p.endswith(" is missing")]
    scores = np.concatenate(
        [t.column("uncertainty").to_numpy() for t in read.shard_tables(dataset, ["uncertainty"])] or [np.zeros(0)]
    ) if not problems else np.zeros(0)
    counts, edges = score_histogram(scores)
    summary = {
        "dataset": dataset,
        "name": manifest["name"],
        "task": manifest["task"],
        "tasks": manifest.get("tasks") or [manifest["task"]],
        "labels": labels,
        "keypoints": manifest.get("keypoints", []),
        "formats": manifest["formats"],
        "num_samples": manifest["num_samples"],
        "num_generated": manifest["num_generated"],
        "num_shards": manifest["num_shards"],
        "complete": manifest["complete"],
        "failed_shards": manifest["failed"],
        "missing_files": missing,
        "broken_files": broken,
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "config_hash": manifest["config_hash"],
        "package_version": manifest["package_version"],
        "calibration": manifest["calibration"],
        "uncertainty": {
            "mean": float(scores.mean()) if scores.size else None,
            "histogram": {"counts": counts.tolist(), "edges": [round(float(e), 6) for e in edges]},
        },
    }
    summary["complete"] = summary["complete"] and not problems
    if problems:  # no samples are read from a dataset whose files do not match its records
        return summary
    stats = label_statistics(read.iter_samples(dataset, limit=stat_samples), layout.task_labels(manifest),
                             manifest["task"])
    summary.update({k: v for k, v in stats.items() if k != "samples_counted"})
    return summary


def progress(dataset: str) -> dict:
    """How far a build without a manifest got: shards done and still to build, from build.json and
    the completion records."""
    build = storage.read_json(storage.join(dataset, layout.BUILD_RECORD))
    g = build["config"]["generate"]
    plan = layout.plan_shards(g["start_seed"], g["num_samples"], g["shard_size"])
    done = layout.read_completions(dataset)
    return {
        "dataset": dataset,
        "name": build["config"]["name"],
        "in_progress": True,
        "complete": False,
        "num_shards": len(plan),
        "shards_done": len(done),
        "num_samples": sum(r["count"] for r in done.values()),
        "missing_shards": [s.name for s in plan if s.name not in done],
        "build_hash": build["build_hash"],
    }


def preview(dataset: str, path: str, num: int = 16, columns: int = 4) -> str:
    """A grid of image | image-with-labels (| depth, near bright) tiles and a class legend, written as
    PNG to `path` (see `factory.dataset.preview`)."""
    manifest = layout.read_manifest(dataset)
    png = preview_lib.draw(read.iter_samples(dataset, limit=num), layout.task_labels(manifest), manifest["task"], columns)
    storage.write_bytes(path, png)
    return path


def format_summary(s: dict) -> str:
    if s.get("in_progress"):
        missing = s["missing_shards"]
        return "\n".join([
            f"dataset   {s['dataset']}  ({s['name']})",
            f"NO MANIFEST: building or interrupted; {s['shards_done']} of {s['num_shards']} shards done "
            f"({s['num_samples']} samples); re-run `factory generate` with the same config to finish",
            f"missing   {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}",
        ])
    lines = [
        f"dataset   {s['dataset']}  ({s['name']}, {' + '.join(s.get('tasks') or [s['task']])})",
        f"samples   {s['num_samples']} kept of {s['num_generated']} generated, in {s['num_shards']} shards "
        f"({', '.join(s['formats'])}), {s['bytes'] / 1e6:.1f} MB, {'complete' if s['complete'] else 'INCOMPLETE'}",
        f"config    {s['config_hash'][:16]}  (factory {s['package_version']})",
    ]
    lines.append(f"filter    {filter_sentence(s)}")
    for f in s["failed_shards"]:
        lines.append(f"FAILED    {f['name']}: {f['error']}")
    for path in s["missing_files"]:
        lines.append(f"MISSING   {path}")
    for problem in s.get("broken_files", []):
        lines.append(f"BROKEN    {problem}; re-run `factory generate` with the same config to rebuild its shard")
    if s.get("broken_files") or s["missing_files"]:
        return "\n".join(lines)
    if not s["num_samples"]:  # every sample dropped or none generated: no statistics to show
        lines.append("labels    no samples: no label statistics and no uncertainty histogram")
        return "\n".join(lines)
    if "class_pixel_frequency" in s:
        lines.append("classes   " + ", ".join(f"{k} {v:.1%}" for k, v in s["class_pixel_frequency"].items()))
    if "keypoint_mean_score" in s:
        lines.append("keypoints " + ", ".join(f"{k} {v:.2f}" for k, v in s["keypoint_mean_score"].items() if v is not None))
    hist = s["uncertainty"]["histogram"]
    peak = max(hist["counts"]) or 1
    lines.append(f"uncertainty per sample (mean {s['uncertainty']['mean']:.4f}):")
    for count, lo, hi in zip(hist["counts"], hist["edges"], hist["edges"][1:]):
        lines.append(f"  {lo:8.4f} - {hi:8.4f} {'#' * round(30 * count / peak):<30} {count}")
    return "\n".join(lines)
