"""The dataset card: `README.md` at the root of every finished dataset, in the Hugging Face
dataset-card format, so a person sees at a glance what the data is and where it came from, and
`datasets.load_dataset(<the folder>)` reads it with no arguments.

    ---                                  YAML front matter (the Hub's metadata)
    configs: [build-<hash>: data_files]  the shards of the dataset's first format (Parquet when
                                         written, else the WebDataset tars), the one default config
    dataset_info: features               the sample columns as `datasets` features (Parquet), or
                                         the tar members and their JSON (WebDataset)
    license, task_categories, tags, size_categories, pretty_name
    ---
    body                                 preview, labels with pixel shares, provenance, the
                                         uncertainty filter, how to read it, the weights' licence

`datasets` picks one loader for a whole folder, so the front matter lists one format; the body says
how to read the other. The card is written by the build's final publish, just before the manifest,
and only when every shard is complete (`recipes/generate.py`).
"""

from __future__ import annotations

import json

import pyarrow as pa
import yaml

from factory import storage
from factory.dataset.sample import (
    IMAGE_FORMATS,
    MEDIA_FIELDS,
    META_SCHEMA,
    SAMPLE_SCHEMA,
    TAR_MEMBERS,
)

CARD = "README.md"
NVIDIA_NC = "nvidia-source-code-license-nc"
SHIPPED_LICENSE = "apache-2.0"
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
TASK_CATEGORIES = {"segmentation": "image-segmentation", "instances": "image-segmentation",
                   "depth": "depth-estimation", "keypoints": "keypoint-detection"}
TASK_IDS = {"segmentation": "semantic-segmentation", "instances": "instance-segmentation"}


def size_category(n: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>1B"


_DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.int32(): "int32", pa.float32(): "float32"}


def features() -> list[dict]:
    """SAMPLE_SCHEMA as `datasets` features: encoded pixels are `image` (decoded to PIL on access)."""
    return [{"name": f.name, "dtype": "image"} if f.name in MEDIA_FIELDS else column_feature(f) for f in SAMPLE_SCHEMA]


def column_feature(f: pa.Field) -> dict:
    """A scalar or list column of the sample schema as a `datasets` feature."""
    if pa.types.is_list(f.type):
        return {"name": f.name, "sequence": _DTYPES[f.type.value_type]}
    return {"name": f.name, "dtype": _DTYPES[f.type]}


JSON_ITEMS = {
    "keypoints": [("name", "string"), ("x", "float64"), ("y", "float64"), ("score", "float64")],
    "instance_classes": [("id", "int64"), ("class", "string"), ("score", "float64")],
}
"""The items of the JSON list fields (`sample.JSON_FIELDS`), as `KEY.json` holds them."""

LABEL_MEMBERS = {"segmentation": "mask", "depth": "depth", "instances": "instances"}
"""Task -> the sample field (and so the WebDataset member) that carries its label map."""


def media_members(manifest: dict) -> list[str]:
    """The image and label-map member extensions of the build's tars (`png` or the image codec's,
    then `seg.png`, `depth.png`, `inst.png` as its tasks write them)."""
    tasks = manifest.get("tasks") or [manifest.get("task", "segmentation")]
    return [IMAGE_FORMATS[manifest.get("image_format", "png")]] + [
        TAR_MEMBERS[LABEL_MEMBERS[t]] for t in tasks if t in LABEL_MEMBERS]


def webdataset_features(manifest: dict) -> list[dict]:
    """A WebDataset-only build's samples as `datasets` features: the image and label-map members
    its tasks write (`image`), `json` (META_SCHEMA, the JSON fields' items typed), `__key__` and
    `__url__`. Declared rather than left to `datasets` to infer from the first tar's first five
    samples, which, when those have no instances (`instance_classes: []`), types the list as null
    and then fails on the first sample that has some."""
    members = media_members(manifest)
    meta = [{"name": f.name, "list": [{"name": n, "dtype": t} for n, t in JSON_ITEMS[f.name]]}
            if f.name in JSON_ITEMS else column_feature(f) for f in META_SCHEMA]
    return ([{"name": m, "dtype": "image"} for m in members] + [{"name": "json", "struct": meta}]
            + [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}])


def weights_license(backbone: dict, configured: str | None) -> dict:
    """The licence of the weights that made the data: {"id", "known", "non_commercial", "text"}.

    Weights from an official NVIDIA pickle are non-commercial whatever the config says; otherwise the
    configured `card.weights_license`, the shipped toy weights' Apache-2.0, or unknown."""
    if backbone["nvidia_official"]:
        return {"id": NVIDIA_NC, "known": True, "non_commercial": True, "text": (
            "**Non-commercial.** The backbone's weights came from an official NVIDIA StyleGAN2 checkpoint "
            "(a stylegan2-ada-pytorch / stylegan3 pickle, directly or through `factory weights convert`), "
            "released under the NVIDIA Source Code License-NC: they, and data made with them, may be used "
            "for non-commercial research and evaluation only. The DatasetGAN annotations are under the same "
            "terms." + (f" (`card.weights_license` says `{configured}`.)" if configured and configured != NVIDIA_NC
                        else ""))}
    if configured:
        return {"id": configured, "known": True, "non_commercial": "nc" in configured.lower().split("-"),
                "text": f"The backbone's weights are under `{configured}` (as set in `card.weights_license`); "
                        "data made with them inherits its terms."}
    if backbone["shipped"]:
        return {"id": SHIPPED_LICENSE, "known": True, "non_commercial": False,
                "text": "The backbone is one of the toy models shipped with `factory` and trained by it on its own "
                        "toy world: Apache-2.0, like the package."}
    if backbone["weights"] is None:
        return {"id": SHIPPED_LICENSE, "known": True, "non_commercial": False,
                "text": "The backbone has seeded random weights made by `factory` itself (Apache-2.0)."}
    return {"id": "unknown", "known": False, "non_commercial": False, "text": (
        "**Unknown.** Nobody said under which licence the backbone's weights are (`card.weights_license`). "
        "Data generated from a model usually inherits the terms of its weights: check them before you "
        "share or use this dataset.")}


def config_name(manifest: dict) -> str:
    """The card's one `datasets` config, named after the build. `datasets` keys its cache of a local
    folder by the folder's name, the config's name and its data_files *patterns*, not the files: two
    builds in folders of the same name (every `<workdir>/dataset`), both called "default", would share
    one cache entry, and `load_dataset` would return the first one's rows for the second. The build
    hash names the bytes (a rebuild of the same build makes the same ones), so the cache is right."""
    return f"build-{manifest['build_hash'][:12]}"


def front_matter(manifest: dict, licence: dict, dataset_license: str | None) -> dict:
    formats = manifest["formats"]
    fmt = "parquet" if "parquet" in formats else "webdataset"
    pattern = "parquet/*.parquet" if fmt == "parquet" else "webdataset/*.tar"
    config = {"config_name": config_name(manifest), "default": True,
              "data_files": [{"split": "train", "path": pattern}]}
    tasks = manifest.get("tasks") or [manifest["task"]]
    if dataset_license is None:
        dataset_license = "other" if licence["non_commercial"] else licence["id"]
    meta = {
        "pretty_name": manifest["name"],
        "license": dataset_license,
        "task_categories": sorted({TASK_CATEGORIES[t] for t in tasks if t in TASK_CATEGORIES}),
        "task_ids": sorted({TASK_IDS[t] for t in tasks if t in TASK_IDS}),
        "tags": ["synthetic", "factory",
                 "datasetdm" if manifest["config"].get("backbone", {}).get("kind") == "diffusion" else "datasetgan"],
        "size_categories": [size_category(manifest["num_samples"])],
        "configs": [config],
    }
    if meta["license"] == "other":
        meta["license_name"] = licence["id"]
    meta["dataset_info"] = {"config_name": config["config_name"],
                            "features": features() if fmt == "parquet" else webdataset_features(manifest)}
    return meta


def render(manifest: dict, provenance: dict, stats: dict, preview: str | None, dataset_license: str | None = None,
           configured_weights_license: str | None = None) -> str:
    """The card's text. `provenance`: {"backbone": weights_provenance + "weights_hash", "decoder": {"url",
    "sha256", "kind", "metrics"}, "labeled_set": {"path", "fingerprint"} or None, "command"};
    `stats`: `label_statistics` of the first samples; `preview`: the preview's path in the dataset."""
    licence = weights_license(provenance["backbone"], configured_weights_license)
    meta = front_matter(manifest, licence, dataset_license)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {manifest['name']}", ""]
    tasks = manifest.get("tasks") or [manifest["task"]]
    lines += [f"{manifest['num_samples']:,} synthetic images with pixel labels ({', '.join(tasks)}), kept of "
              f"{manifest['num_generated']:,} generated, in {manifest['num_shards']} shards "
              f"({', '.join(manifest['formats'])}), made by "
              f"factory {manifest['package_version']}: a generative backbone "
              "whose internal features a small decoder, fitted on a few annotated images, turns into labels "
              "(DatasetGAN / DatasetDM).", ""]
    if preview:
        lines += ["## Preview", "", f"![the first samples, each beside its labels]({preview})", "",
                  "Each tile: the image, then the image with its labels overlaid (and the depth, near is bright, "
                  "when the dataset has depth).", ""]
    lines += ["## Labels", ""]
    labels = manifest["labels"]
    if "class_pixel_frequency" in stats:
        lines += [f"Share of pixels per class over the first {stats['samples_counted']:,} samples:", "",
                  "| id | class | pixels |", "|---|---|---|"]
        lines += [f"| {i} | {name} | {stats['class_pixel_frequency'].get(name, 0):.2%} |" for i, name in enumerate(labels)]
    elif "keypoint_mean_score" in stats:
        lines += [f"Mean keypoint score over the first {stats['samples_counted']:,} samples:", "",
                  "| id | keypoint | mean score |", "|---|---|---|"]
        lines += [f"| {i} | {name} | {score:.3f} |" if score is not None else f"| {i} | {name} | - |"
                  for i, (name, score) in enumerate(stats["keypoint_mean_score"].items())]
    lines.append("")
    lines += provenance_section(manifest, provenance)
    lines += filter_section(manifest)
    lines += reading_section(manifest, manifest["config"].get("generate", {}).get("output") or "THIS_FOLDER")
    lines += ["## Licence of the weights", "", licence["text"], ""]
    return "\n".join(lines)


def provenance_section(manifest: dict, p: dict) -> list[str]:
    b, d, labeled = p["backbone"], p["decoder"], p.get("labeled_set")
    source = b.get("source") or {}
    converted = source.get("converted_from")
    rows = [
        ("backbone", f"{b['kind']}, {b['format']}" + (" (shipped with factory)" if b["shipped"] else "")),
        ("backbone weights", f"`{b['weights']}`" if b["weights"] else "none (random)"),
        ("backbone weights hash", f"`{b['weights_hash']}`"),
    ]
    if b.get("sha256"):
        rows.append(("backbone file sha256", f"`{b['sha256']}`"))
    if converted:
        rows.append(("converted from", f"`{converted.get('file')}` ({converted.get('format')}, sha256 "
                                       f"`{converted.get('sha256')}`)"))
    if source.get("trained_by"):
        rows.append(("trained by", f"`{source['trained_by']}` ({source.get('steps')} steps; images hash "
                                   f"`{source.get('images')}`)"))
    rows += [("decoder", f"{d['kind']} at `{d['url']}`"), ("decoder weights sha256", f"`{d['sha256']}`")]
    if d.get("metrics"):
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d["metrics"].items())
        rows.append(("decoder metrics", shown))  # the last step's; val_* where labels were held back
    if labeled:
        rows.append(("labeled set", f"`{labeled['path']}`, fingerprint `{labeled['fingerprint']}`"
                     + (f", {labeled['images']} images" if labeled.get("images") else "")))
    else:
        rows.append(("labeled set", "not recorded (the decoder has no metrics.json and the labeled set is not at hand)"))
    rows += [("config hash (samples)", f"`{manifest['config_hash']}`"), ("build hash", f"`{manifest['build_hash']}`"),
             ("factory version", manifest["package_version"]), ("command", f"`{p.get('command') or 'not recorded'}`")]
    g = manifest["config"].get("generate", {})
    if g:
        rows.append(("seeds", f"{g['start_seed']:,} to {g['start_seed'] + g['num_samples'] - 1:,}, "
                              f"{g['shard_size']:,} per shard, batches of {g['batch_size']}"))
    return (["## How it was made", "", "A sample is a function of (config, seed): rebuilding with the same "
             "config gives the same bytes. The full resolved config is in `manifest.json` and `build.json`.", "",
             "| what | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""])


def scores_alike(manifest: dict) -> bool:
    """The filter was asked to drop samples but the calibration scores do not vary (a one-head
    decoder, or one without a segmentation head): nothing to rank by, nothing dropped."""
    c = manifest.get("calibration")
    q = (c or {}).get("score_quantiles", {})
    return bool(c and q and manifest["num_generated"] == manifest["num_samples"]
                and q.get("p10") == q.get("p99") == c["threshold"])


def filter_sentence(manifest: dict) -> str:
    """What the uncertainty filter did, in one plain sentence (`factory inspect`, the HTML report)."""
    c = manifest.get("calibration")
    if not c:
        return "Nothing was dropped (generate.drop_uncertain=0)."
    if scores_alike(manifest):
        return (f"Nothing was dropped: the scores of the first {c['num_scored']:,} seeds do not vary (all "
                f"{c['threshold']:.5f}), so this decoder has no disagreement to rank samples by.")
    dropped = manifest["num_generated"] - manifest["num_samples"]
    return (f"Samples scoring above {c['threshold']:.5f} were dropped: {dropped:,} of {manifest['num_generated']:,} "
            f"({dropped / max(manifest['num_generated'], 1):.0%}; generate.drop_uncertain={c['drop_fraction']:g} "
            f"set the threshold at that quantile of the first {c['num_scored']:,} seeds' scores).")


def filter_section(manifest: dict) -> list[str]:
    c = manifest.get("calibration")
    lines = ["## Uncertainty filter", ""]
    if not c:
        return lines + ["Nothing was dropped (`generate.drop_uncertain=0`). Every sample keeps its "
                        "`uncertainty` score, so you can filter yourself.", ""]
    q = c.get("score_quantiles", {})
    dropped = manifest["num_generated"] - manifest["num_samples"]
    if scores_alike(manifest):
        return lines + [(
            f"`generate.drop_uncertain={c['drop_fraction']}` asked to drop the most uncertain samples, but the scores "
            f"of the first {c['num_scored']:,} seeds do not vary (10th to 99th percentile all {c['threshold']:.5f}): "
            "this decoder has no disagreement to rank by (one head, or no segmentation head), and no sample was "
            "dropped."), ""]
    return lines + [
        f"The decoder is an ensemble; a sample's `uncertainty` is the mean Jensen-Shannon disagreement of its "
        f"heads over its most uncertain pixels. Samples scoring above **{c['threshold']:.5f}** were dropped: "
        f"{dropped:,} of {manifest['num_generated']:,} ({dropped / max(manifest['num_generated'], 1):.0%}). The "
        f"threshold is the {1 - c['drop_fraction']:.0%} quantile of the first {c['num_scored']:,} seeds' scores "
        f"(`generate.drop_uncertain={c['drop_fraction']:g}`; median {q.get('p50', float('nan')):.5f}, p90 "
        f"{q.get('p90', float('nan')):.5f}), so the share dropped over the whole build is near "
        f"{c['drop_fraction']:.0%}, not exactly it. Every kept sample keeps its score, so you can filter further.", ""]


def reading_section(manifest: dict, where: str) -> list[str]:
    formats = manifest["formats"]
    where = where.removeprefix("file://")  # a local folder: the plain path, which every reader takes
    q = json.dumps(where)  # the dataset's URL as a Python string literal
    tars = json.dumps(f"{where}/webdataset/*.tar")
    lines = ["## How to read it", "", "With factory installed (`ShardDataset` works on a local folder or `s3://`):", "",
             "```python", "from torch.utils.data import DataLoader", "from factory.dataset.read import ShardDataset, ray_dataset",
             "", f"loader = DataLoader(ShardDataset({q}, shuffle=True), batch_size=32)  # (image, mask, meta)",
             (f"ds = ray_dataset({q})  # a ray.data.Dataset of the Parquet rows" if "parquet" in formats else
              f'ds = ray_dataset({q}, format="webdataset")  # a ray.data.Dataset of the tars\' samples'), "```", "",
             "With the Hugging Face `datasets` library (this card's front matter tells it where the data is):", "",
             "```python", "import datasets", "", f'ds = datasets.load_dataset({q}, split="train")']
    if "parquet" in formats:
        lines += ['ds[0]["image"], ds[0]["mask"]  # PIL images; mask pixel value = class id']
    lines += ["```", ""]
    if "parquet" in formats:
        lines += ["With Ray Data or pyarrow alone:", "", "```python", "import ray", "",
                  f"ds = ray.data.read_parquet({json.dumps(where + '/parquet')})", "```", ""]
    tasks = manifest.get("tasks") or [manifest.get("task", "segmentation")]
    if "webdataset" in formats:
        members = [*media_members(manifest), "json"]
        lines += [(f"With webdataset (members {', '.join(f'`KEY.{m}`' for m in members)}; the label maps decoded "
                   "as stored: class ids, 16-bit depth; `empty_check=False` because a shard the filter emptied is "
                   "an empty tar):"), "", "```python",
                  "import glob, io", "import numpy as np, PIL.Image, webdataset as wds", "",
                  "def as_stored(data):", "    return np.array(PIL.Image.open(io.BytesIO(data)))", "",
                  f"ds = wds.WebDataset(sorted(glob.glob({tars})), shardshuffle=False, empty_check=False).decode(",
                  '    wds.handle_extension("seg.png depth.png inst.png", as_stored), "rgb8")', "```", ""]
        if not storage.is_local(where):  # glob and webdataset read local files (and `pipe:` commands)
            lines += [("Here the tars are not local files: copy `webdataset/` down and glob the copy, or give "
                       "webdataset one `pipe:aws s3 cp URL -` per tar; `ShardDataset` above reads them where they are."), ""]
        first = (manifest.get("shards") or [{}])[0]
        if "parquet" in formats and first.get("count") == 0:  # datasets infers the columns from the first tar
            lines += [("`datasets` reads one format per folder, the Parquet shards here; its `webdataset` loader "
                       "infers a tar's columns from the first tar's samples, and the filter left the first tar here "
                       "empty: read the tars with webdataset as above, or `ShardDataset(..., format=\"webdataset\")`."), ""]
        elif "parquet" in formats:
            lines += ["`datasets` reads one format per folder, the Parquet shards here; for the tars: "
                      f'`datasets.load_dataset("webdataset", data_files={tars})`.', ""]
    if "depth" in tasks:
        scale = manifest.get("config", {}).get("labels", {}).get("depth_scale")
        lines += [(f"Depth is a 16-bit PNG of metres x `depth_scale` ({scale:g} in this build; also a column and a "
                   "`KEY.json` field): divide by it for metres; 0 is no depth." if scale else
                   "Depth is a 16-bit PNG of metres x `depth_scale` (a column and a `KEY.json` field): divide by it "
                   "for metres; 0 is no depth."), ""]
    files = ([("`parquet/shard-NNNNN.parquet` (one row per sample)")] if "parquet" in formats else []) + (
        ["`webdataset/shard-NNNNN.tar` (+ `.meta.parquet`)"] if "webdataset" in formats else [])
    if manifest.get("config", {}).get("backbone", {}).get("kind") == "diffusion":
        files.append("`prompts.jsonl` (the build's prompts; sample i takes prompt i mod their number)")
    lines += [("Files: " + ", ".join(files) + ", `_stats/` (a completion record per shard: counts, sha256 of every "
               "file, timings), `manifest.json` (written last), `calibration.json`, `build.json`."), ""]
    return lines


def write(output: str, text: str) -> str:
    url = storage.join(output, CARD)
    storage.write_bytes(url, text.encode())
    return url
