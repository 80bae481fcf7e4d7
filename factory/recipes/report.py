"""`factory inspect --html`: one self-contained HTML page about a dataset, for a person to look at.

Everything is inline (images and plots as data URIs, styles in the page), so the file opens from
disk or as a mail attachment with no server and no network. Sections, each with an id:

    overview      what the dataset is: samples, formats, size, hashes, completeness
    preview       the first samples with masks, depth and keypoints overlaid, and a legend
    classes       per-class pixel frequency bars (keypoint datasets: mean keypoint scores)
    uncertainty   histogram of the kept samples' scores with the filter threshold
    shards        per-shard counts and timings, as a table and a plot
    failures      failed shards and files the manifest lists that are missing
    decoder       the decoder's metrics: its last step's, validation where labels were held back
                  (metrics.json beside it, from `factory train`)

Plots are drawn with matplotlib on its Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from matplotlib.figure import Figure

from factory import storage
from factory.dataset import layout, read
from factory.dataset import preview as preview_lib
from factory.dataset.card import filter_sentence
from factory.dataset.stats import score_histogram
from factory.decoders.files import METRICS_FILE

SECTIONS = ("overview", "preview", "classes", "uncertainty", "shards", "failures", "decoder")

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.bad{color:#b00020;font-weight:bold}.ok{color:#1b7f3b;font-weight:bold}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #333;vertical-align:middle;margin-right:6px}
.legend span.item{display:inline-block;margin:2px 14px 2px 0}img{max-width:100%}code{font-size:.9em}
"""


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return png_uri(buf.getvalue())


def class_bars(frequency: dict[str, float], colors: np.ndarray) -> str:
    names = list(frequency)
    fig = Figure(figsize=(7, 0.35 * len(names) + 1))
    ax = fig.subplots()
    ax.barh(names, [100 * frequency[n] for n in names], color=colors[: len(names)] / 255, edgecolor="black")
    ax.invert_yaxis()
    ax.set_xlabel("share of pixels (%)")
    for y, n in enumerate(names):
        ax.text(100 * frequency[n], y, f" {100 * frequency[n]:.2f}%", va="center", fontsize=8)
    return figure_uri(fig)


def keypoint_bars(scores: dict[str, float | None]) -> str:
    names = list(scores)
    fig = Figure(figsize=(7, 0.35 * len(names) + 1))
    ax = fig.subplots()
    ax.barh(names, [scores[n] or 0.0 for n in names], color="#4477aa")
    ax.invert_yaxis()
    ax.set_xlabel("mean keypoint score")
    return figure_uri(fig)


def uncertainty_histogram(scores: np.ndarray, threshold: float | None) -> str:
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    counts, edges = score_histogram(scores, bins=30)
    ax.stairs(counts, edges, fill=True, color="#4477aa")
    if threshold is not None:
        ax.axvline(threshold, color="#b00020", linestyle="--", label=f"filter threshold {threshold:.4f}")
        ax.legend()
    ax.set_xlabel("uncertainty (mean JS disagreement of the ensemble over the top pixels)")
    ax.set_ylabel("kept samples")
    return figure_uri(fig)


def shard_timings(records: list[dict]) -> str:
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    x = np.arange(len(records))
    bottom = np.zeros(len(records))
    for key, color in (("model_s", "#4477aa"), ("encode_wait_s", "#66ccee"), ("write_s", "#228833"),
                       ("publish_s", "#ccbb44"), ("finish_staged_s", "#ee6677")):
        values = np.array([r["timings"].get(key, 0.0) for r in records])
        if values.any():
            ax.bar(x, values, bottom=bottom, color=color, label=key.removesuffix("_s"))
            bottom += values
    ax.set_xticks(x, [r["name"].removeprefix("shard-") for r in records], rotation=90, fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_xlabel("shard")
    ax.legend(fontsize=8)
    return figure_uri(fig)


class Markup(str):
    """HTML that `table` inserts as is (everything else is escaped)."""


def table(rows: list[tuple], header: tuple | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c if isinstance(c, Markup) else html.escape(str(c))}</td>" for c in row)
                   + "</tr>")
    out.append("</table>")
    return "".join(out)


def decoder_metrics(manifest: dict) -> dict | None:
    """The metrics of the decoder that made the dataset, as its build recorded them (`provenance`);
    for a manifest without that record (a build made before manifests kept it), the metrics.json
    beside the decoder now, if it can be read from here, marked `read_now`."""
    recorded = manifest.get("provenance")
    if recorded:
        d = recorded["decoder"]
        return {"metrics": d.get("metrics") or {}, "val_images": d.get("val_images"),
                "labeled_set": recorded.get("labeled_set"), "sha256": d.get("sha256")}
    url = manifest.get("config", {}).get("generate", {}).get("decoder")
    if not url:
        return None
    try:
        path = storage.join(url, METRICS_FILE)
        return {**storage.read_json(path), "read_now": url} if storage.exists(path) else None
    except (OSError, ValueError):  # a decoder on storage this machine cannot reach
        return None


def render(dataset: str, summary: dict, preview_samples: int = 16) -> str:
    """The page's HTML for the finished dataset at `dataset`, whose `inspect.summarize` is `summary`."""
    manifest = layout.read_manifest(dataset)
    labels = layout.task_labels(manifest)  # the legend's: classes, or a keypoints dataset's keypoints
    task = manifest["task"]
    tasks = manifest.get("tasks") or [task]
    colors = preview_lib.palette(max(len(labels), 2))
    damage = len(summary.get("missing_files", [])) + len(summary.get("broken_files", []))
    # no samples are read from a dataset whose files do not match their records (see Failures)
    unread = (f"Not drawn: {damage} file(s) are missing or do not match their completion records, "
              "so no samples were read (see Failures).") if damage else None
    parts = [f"<h1>{html.escape(manifest['name'])}: {manifest['num_samples']:,} samples</h1>"]

    # overview
    state = Markup('<span class="ok">complete</span>') if summary["complete"] else Markup('<span class="bad">INCOMPLETE</span>')
    parts.append('<section id="overview"><h2>Overview</h2>' + table([
        ("dataset", dataset), ("tasks", " + ".join(tasks)),
        *([("classes", ", ".join(manifest["labels"]))] if {"segmentation", "instances"} & set(tasks) else []),
        *([("keypoints", ", ".join(manifest["keypoints"]))] if manifest.get("keypoints") else []), ("status", state),
        ("samples", f"{manifest['num_samples']:,} kept of {manifest['num_generated']:,} generated"),
        ("shards", f"{manifest['num_shards']} ({', '.join(manifest['formats'])})"),
        ("size", f"{summary['bytes'] / 1e6:.1f} MB"), ("config hash", manifest["config_hash"]),
        ("build hash", manifest["build_hash"]), ("factory version", manifest["package_version"]),
    ]) + "</section>")

    # preview with legend
    if unread:
        parts.append(f'<section id="preview"><h2>Preview</h2><p>{html.escape(unread)}</p></section>')
    else:
        png = preview_lib.draw(read.iter_samples(dataset, limit=preview_samples), labels, task)
        legend = "".join(
            f'<span class="item"><span class="swatch" style="background:rgb{preview_lib.legend_color(colors, i, task)}">'
            f"</span>{i}: {html.escape(name)}</span>" for i, name in enumerate(labels))
        parts.append('<section id="preview"><h2>Preview</h2><p>Each tile: the image, the image with its labels '
                     "overlaid (and depth, near is bright, when the dataset has it; keypoints as dots).</p>"
                     f'<img alt="preview" src="{png_uri(png)}"><p class="legend">{legend}</p></section>')

    # classes
    if "class_pixel_frequency" in summary:
        plot = f'<img alt="class frequencies" src="{class_bars(summary["class_pixel_frequency"], colors)}">'
        caption = "Share of pixels per class over the first samples."
    elif "keypoint_mean_score" in summary:
        plot = f'<img alt="keypoint scores" src="{keypoint_bars(summary["keypoint_mean_score"])}">'
        caption = "Mean score per keypoint over the first samples."
    else:
        plot, caption = "", unread or f"No class or keypoint labels in a {html.escape(task)} dataset."
    parts.append(f'<section id="classes"><h2>Labels</h2><p>{caption}</p>{plot}</section>')

    # uncertainty
    c = manifest.get("calibration")
    threshold = c["threshold"] if c else None
    note = filter_sentence(manifest)
    if unread:
        plot = f"<p>{html.escape(unread)}</p>"
    else:
        scores = np.concatenate([t.column("uncertainty").to_numpy() for t in read.shard_tables(dataset, ["uncertainty"])]
                                or [np.zeros(0)])
        plot = f'<img alt="uncertainty histogram" src="{uncertainty_histogram(scores, threshold)}">'
    parts.append(f'<section id="uncertainty"><h2>Uncertainty</h2><p>{html.escape(note)}</p>{plot}</section>')

    # shards
    records = manifest["shards"]
    rows = [(r["name"], f"{r['start_seed']}-{r['stop_seed'] - 1}", r["generated"], r["dropped"], r["count"],
             f"{r['bytes'] / 1e6:.2f}", f"{r['timings'].get('total_s', 0):.2f}",
             f"{r['uncertainty']['mean']:.4f}") for r in records]
    plot = f'<img alt="shard timings" src="{shard_timings(records)}">' if records else ""
    parts.append('<section id="shards"><h2>Shards</h2>' + table(
        rows, ("shard", "seeds", "generated", "dropped", "kept", "MB", "seconds", "mean uncertainty (all generated)"))
        + plot + "</section>")

    # failures
    failed = summary["failed_shards"]
    missing = summary["missing_files"]
    broken = summary.get("broken_files", [])
    if failed or missing or broken:
        rebuild = "re-run `factory generate` with the same config to rebuild its shard"
        body = table([(f["name"], Markup('<span class="bad">failed</span>'), f["error"]) for f in failed]
                     + [(p, Markup('<span class="bad">missing</span>'), f"listed in the manifest, not in storage; {rebuild}")
                        for p in missing]
                     + [(p.split(" ", 1)[0], Markup('<span class="bad">broken</span>'), f"{p.split(' ', 1)[-1]}; {rebuild}")
                        for p in broken], ("shard / file", "state", "why"))
    else:
        body = '<p class="ok">No failed shards, no missing or damaged files.</p>'
    parts.append(f'<section id="failures"><h2>Failed, missing or damaged</h2>{body}</section>')

    # decoder
    trained = decoder_metrics(manifest)
    if trained:
        rows = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in (trained.get("metrics") or {}).items()]
        labeled = trained.get("labeled_set") or {}
        if labeled:
            rows.append(("labeled set", f"{labeled.get('path')} ({labeled.get('images', '?')} images, fingerprint "
                                        f"{str(labeled.get('fingerprint'))[:16]})"))
        rows.append(("validation images", trained.get("val_images")))
        if trained.get("sha256"):
            rows.append(("decoder weights sha256", trained["sha256"]))
        when = (f"Read now from {trained['read_now']}: this build did not record them, and the decoder may have "
                "been re-trained since." if trained.get("read_now") else "As recorded when this dataset was built.")
        body = f"<p>{html.escape(when)}</p>" + table(rows, ("metric", "value"))
    else:
        body = "<p>Not available: the decoder's metrics.json cannot be read from here.</p>"
    parts.append(f'<section id="decoder"><h2>Decoder metrics</h2>{body}</section>')

    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(manifest['name'])}: factory dataset report</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>")


def write_report(dataset: str, summary: dict, out: str) -> str:
    """Write the page for `dataset` to `out` (a local path or storage URL); returns `out`."""
    storage.write_bytes(out, render(dataset, summary).encode())
    return out
