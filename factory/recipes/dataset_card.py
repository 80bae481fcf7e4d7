"""The card and preview a finished build publishes (`generate`'s final step, before the manifest):
gathers what made the data (the backbone's provenance, the decoder and its metrics, the labeled set)
and writes `README.md` and `preview.png` at the dataset root (`factory.dataset.card`)."""

from __future__ import annotations

import logging

from factory import storage
from factory.backbones import backbone_identity
from factory.backbones.provenance import weights_provenance
from factory.config import FactoryConfig
from factory.dataset import card, layout, read
from factory.dataset import preview as preview_lib
from factory.dataset.stats import label_statistics
from factory.decoders.files import METRICS_FILE, MODEL_FILE
from factory.fingerprint import safetensors_fingerprint

log = logging.getLogger(__name__)


def decoder_record(url: str) -> dict:
    """The decoder at `url`: its kind, weights sha256 and the metrics.json `factory train` wrote."""
    with storage.local_copy(url, [MODEL_FILE]) as local:
        sha = safetensors_fingerprint(f"{local}/{MODEL_FILE}")
    labels_url = storage.join(url, "labels.json")
    kind = storage.read_json(labels_url).get("kind", "?") if storage.exists(labels_url) else "?"
    metrics_url = storage.join(url, METRICS_FILE)
    trained = storage.read_json(metrics_url) if storage.exists(metrics_url) else {}
    return {"url": url, "sha256": sha, "kind": kind, "metrics": trained.get("metrics"),
            "val_images": trained.get("val_images"), "labeled_set": trained.get("labeled_set")}


def provenance(cfg: FactoryConfig, command: str | None) -> dict:
    """What the card says made the data (see `card.render`)."""
    backbone = weights_provenance(cfg.backbone)
    backbone["weights_hash"] = backbone_identity(cfg.backbone).weights_hash
    decoder = decoder_record(cfg.generate.decoder)
    labeled = decoder.pop("labeled_set")
    if labeled is None and storage.exists(cfg.train.labeled):  # a decoder trained before metrics.json
        labeled = {"path": cfg.train.labeled, "fingerprint": safetensors_fingerprint(storage.fetch(cfg.train.labeled))}
    return {"backbone": backbone, "decoder": decoder, "labeled_set": labeled, "command": command}


def publish_card(cfg: FactoryConfig, manifest: dict, command: str | None = None) -> str:
    """Write preview.png and README.md for the complete build `manifest` describes (not yet
    published: its shards are read through it), and record what made the data in the manifest as
    `provenance` (the card's numbers, kept for the report and other clients: a decoder re-trained
    later does not change what built this data). Warns when the weights' licence is unknown."""
    out, c = cfg.generate.output, cfg.card
    p = manifest["provenance"] = provenance(cfg, command)
    licence = card.weights_license(p["backbone"], c.weights_license)
    if not licence["known"]:
        log.warning("the licence of backbone weights %s is unknown: set card.weights_license (the dataset "
                    "card says it is unknown)", cfg.backbone.weights)
    preview = preview_lib.draw(read.iter_samples(out, limit=c.preview_samples, manifest=manifest),
                               layout.task_labels(manifest), manifest["task"])
    storage.write_bytes(storage.join(out, preview_lib.PREVIEW), preview)
    stats = label_statistics(read.iter_samples(out, limit=c.stat_samples, manifest=manifest),
                             layout.task_labels(manifest), manifest["task"])
    text = card.render(manifest, p, stats, preview_lib.PREVIEW, c.license, c.weights_license)
    return card.write(out, text)
