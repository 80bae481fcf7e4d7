"""`factory inspect`: what a dataset holds, in numbers and in one picture a person can check."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from factory import storage
from factory.dataset import layout, read

TILE = 128


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: distinct, stable colours for class ids 0..n-1 (0 is black)."""
    colors = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors[i] = (r, g, b)
    return colors


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
    counts, edges = np.histogram(scores, bins=10) if scores.size else (np.zeros(10, int), np.zeros(11))
    summary = {
        "dataset": dataset,
        "name": manifest["name"],
        "task": manifest["task"],
        "labels": labels,
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
    if manifest["task"] == "segmentation":
        pixels = np.zeros(len(labels), dtype=np.int64)
        for sample in read.iter_samples(dataset, limit=stat_samples):
            pixels += np.bincount(sample["mask"].ravel(), minlength=len(labels))[: len(labels)]
        total = max(int(pixels.sum()), 1)
        summary["class_pixel_frequency"] = {name: round(int(c) / total, 6) for name, c in zip(labels, pixels)}
    else:
        scores_by_kp: dict[str, list[float]] = {name: [] for name in labels}
        for sample in read.iter_samples(dataset, limit=stat_samples):
            for kp in sample["keypoints"]:
                scores_by_kp[kp["name"]].append(kp["score"])
        summary["keypoint_mean_score"] = {k: float(np.mean(v)) if v else None for k, v in scores_by_kp.items()}
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
    PNG to `path`."""
    manifest = layout.read_manifest(dataset)
    labels = manifest["labels"]
    colors = palette(max(len(labels), 2))
    tiles = []
    for sample in read.iter_samples(dataset, limit=num):
        image = sample["image"]
        overlay = image.copy()
        if sample["mask"] is not None:  # class 0 (background) is left untinted
            tinted = (0.4 * image + 0.6 * colors[sample["mask"]]).astype(np.uint8)
            overlay = np.where(sample["mask"][..., None] > 0, tinted, image)
        panels = [image, overlay]
        if sample.get("depth") is not None:  # inverse depth, normalised per image: near is bright
            inverse = 1.0 / np.maximum(sample["depth"], 1e-3)
            span = max(float(inverse.max() - inverse.min()), 1e-6)
            grey = ((inverse - inverse.min()) / span * 255).astype(np.uint8)
            panels.append(np.repeat(grey[..., None], 3, axis=2))
        pair = Image.fromarray(np.concatenate(panels, axis=1)).resize((len(panels) * TILE, TILE), Image.NEAREST)
        if sample["keypoints"]:
            draw = ImageDraw.Draw(pair)
            scale = TILE / image.shape[1]
            for i, kp in enumerate(sample["keypoints"]):
                x, y = TILE + kp["x"] * scale, kp["y"] * scale
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=tuple(int(c) for c in colors[(i + 1) % len(colors)]))
        tiles.append(pair)
    rows = max(1, -(-len(tiles) // columns))
    legend_h = 18 * (-(-len(labels) // 4)) + 8
    tile_w = tiles[0].width if tiles else 2 * TILE
    grid = Image.new("RGB", (columns * (tile_w + 4), rows * (TILE + 4) + legend_h), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * (tile_w + 4), (i // columns) * (TILE + 4)))
    draw = ImageDraw.Draw(grid)
    top = rows * (TILE + 4) + 4
    for i, name in enumerate(labels):
        x, y = (i % 4) * (grid.width // 4) + 4, top + (i // 4) * 18
        color = tuple(int(c) for c in colors[i]) if manifest["task"] == "segmentation" else tuple(
            int(c) for c in colors[(i + 1) % len(colors)])
        draw.rectangle([x, y, x + 12, y + 12], fill=color, outline=(0, 0, 0))
        draw.text((x + 18, y), f"{i}: {name}", fill=(0, 0, 0))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
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
        f"dataset   {s['dataset']}  ({s['name']}, {s['task']})",
        f"samples   {s['num_samples']} kept of {s['num_generated']} generated, in {s['num_shards']} shards "
        f"({', '.join(s['formats'])}), {s['bytes'] / 1e6:.1f} MB, {'complete' if s['complete'] else 'INCOMPLETE'}",
        f"config    {s['config_hash'][:16]}  (factory {s['package_version']})",
    ]
    if s["calibration"]:
        c = s["calibration"]
        lines.append(f"filter    dropped the {c['drop_fraction']:.0%} most uncertain: scores above "
                     f"{c['threshold']:.5f} (calibrated on {c['num_scored']} seeds)")
    for f in s["failed_shards"]:
        lines.append(f"FAILED    {f['name']}: {f['error']}")
    for path in s["missing_files"]:
        lines.append(f"MISSING   {path}")
    for problem in s.get("broken_files", []):
        lines.append(f"BROKEN    {problem}; re-run `factory generate` with the same config to rebuild its shard")
    if s.get("broken_files") or s["missing_files"]:
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
