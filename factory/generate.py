"""Generate a labeled dataset on Ray Data.

    shard plan (seed ranges) -> actor pool: backbone -> decoder -> encode -> shard writer -> completion records
                             -> manifest.json (driver, last)

Each actor loads the backbone and the fitted decoder once and builds whole shards, so shard files
are named from their seed range, written under a temporary name and published atomically; the
completion record it returns is what resume and the manifest are built from.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import traceback
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from factory import __version__, shards, storage
from factory import config as config_lib
from factory.backbones import Backbone, load_backbone
from factory.config import FactoryConfig
from factory.decoders import MODEL_FILE, FittedDecoder, load_decoder, read_decoder_metadata
from factory.fingerprint import safetensors_fingerprint
from factory.shards import ShardSpec

log = logging.getLogger(__name__)


class GenerateError(RuntimeError):
    """Generation could not start or some shards failed; the message says which."""


def sample_hash(cfg: FactoryConfig, backbone_hash: str, decoder_dir: str) -> str:
    """Identifies everything a sample's bytes depend on besides its seed."""
    decoder_sha = safetensors_fingerprint(os.path.join(decoder_dir, MODEL_FILE))
    return config_lib.stable_hash(
        {"backbone": backbone_hash, "psi": cfg.backbone.psi, "rgb_taps": cfg.backbone.rgb_taps, "decoder": decoder_sha}
    )


def build_hash(cfg: FactoryConfig, sample_config_hash: str) -> str:
    """Identifies a whole dataset: sample settings plus the shard layout."""
    g = cfg.generate
    return config_lib.stable_hash([sample_config_hash, g.start_seed, g.num_samples, g.shard_size])


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def label_seeds(
    backbone: Backbone, decoder: FittedDecoder, seeds: list[int], shard: int, psi: float, config_hash: str
) -> list[dict]:
    """Seeds -> encoded sample rows (SAMPLE_SCHEMA): the whole per-sample work, free of Ray."""
    out = backbone(seeds)
    size = (backbone.resolution, backbone.resolution)
    labels = decoder(out.features, size)
    rows = []
    for i, seed in enumerate(seeds):
        keypoints = None
        if labels.keypoints is not None:
            keypoints = json.dumps(
                [
                    {"name": name, "x": round(float(x), 3), "y": round(float(y), 3), "score": round(float(s), 4)}
                    for name, (x, y, s) in zip(decoder.label_names, labels.keypoints[i].tolist())
                ]
            )
        rows.append(
            {
                "key": f"{seed:012d}",
                "seed": seed,
                "shard": shard,
                "latent": out.latents[i].numpy(),
                "psi": psi,
                "width": size[1],
                "height": size[0],
                "image": png(out.images[i].numpy()),
                "mask": png(labels.masks[i].numpy()) if labels.masks is not None else None,
                "keypoints": keypoints,
                "uncertainty": float(labels.score[i]),
                "config_hash": config_hash,
            }
        )
    return rows


def build_shard(
    backbone: Backbone, decoder: FittedDecoder, cfg: FactoryConfig, spec: ShardSpec, config_hash: str
) -> dict:
    """Generate, encode and publish one shard; returns its completion record (written last)."""
    timings = {"label_encode_s": 0.0, "write_s": 0.0}
    writer = shards.ParquetShardWriter(cfg.generate.output, spec)
    scores: list[float] = []
    started = time.perf_counter()
    try:
        seeds = list(spec.seeds)
        for start in range(0, len(seeds), cfg.generate.batch_size):
            t0 = time.perf_counter()
            rows = label_seeds(
                backbone, decoder, seeds[start : start + cfg.generate.batch_size], spec.index,
                cfg.backbone.psi, config_hash,
            )
            t1 = time.perf_counter()
            for row in rows:
                writer.write(row)
                scores.append(row["uncertainty"])
            timings["label_encode_s"] += t1 - t0
            timings["write_s"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        files = writer.close()
        timings["write_s"] += time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    timings["total_s"] = time.perf_counter() - started
    u = np.asarray(scores, dtype=np.float64)
    record = {
        "shard": spec.index,
        "name": spec.name,
        "start_seed": spec.start_seed,
        "stop_seed": spec.stop_seed,
        "count": writer.count,
        "files": files,
        "bytes": sum(f["bytes"] for f in files),
        "uncertainty": {
            "mean": float(u.mean()), "min": float(u.min()), "max": float(u.max()),
            "p90": float(np.quantile(u, 0.9)),
        },
        "config_hash": config_hash,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
    shards.write_completion(cfg.generate.output, spec, record)
    return record


class ShardBuilder:
    """Ray Data actor: loads the models once, then turns rows of shard specs into completion records.

    A shard that raises is reported as failed (with its error) instead of failing the whole build:
    the other shards still finish, and the driver records the failure in the manifest and exits
    non-zero. A failed shard publishes nothing, so a re-run builds it again.
    """

    def __init__(self, cfg: dict, config_hash: str) -> None:
        self.cfg = config_lib.from_dict(cfg)
        storage.configure(self.cfg.storage)
        device = "cuda" if self.cfg.generate.gpus_per_actor > 0 else "cpu"
        self.backbone = load_backbone(self.cfg.backbone, device)
        self.decoder = load_decoder(self.cfg.generate.decoder, device)
        self.config_hash = config_hash

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for index, start, stop in zip(batch["index"], batch["start_seed"], batch["stop_seed"]):
            spec = ShardSpec(int(index), int(start), int(stop))
            try:
                record = build_shard(self.backbone, self.decoder, self.cfg, spec, self.config_hash)
            except Exception as e:  # recorded in the manifest and the exit code by the driver
                log.error("shard %s failed:\n%s", spec.name, traceback.format_exc())
                record = {"shard": spec.index, "name": spec.name, "failed": f"{type(e).__name__}: {e}"}
            out.append(json.dumps(record))
        return {"record": np.asarray(out, dtype=object)}


def generate(cfg: FactoryConfig) -> dict:
    """Build (or resume) the dataset at `generate.output`; returns the manifest."""
    import ray
    from ray.data import ActorPoolStrategy

    g = cfg.generate
    storage.configure(cfg.storage)
    # 1. Check inputs: the decoder exists and was fitted on this backbone.
    meta = read_decoder_metadata(g.decoder)
    backbone = load_backbone(cfg.backbone)
    if meta["backbone_hash"] != backbone.weights_hash:
        raise GenerateError(
            f"decoder {g.decoder} was fitted on backbone {meta['backbone_hash'][:12]}, the config builds "
            f"{backbone.weights_hash[:12]}; check backbone.weights / backbone.init_seed or re-train"
        )
    config_hash = sample_hash(cfg, backbone.weights_hash, g.decoder)
    dataset_hash = build_hash(cfg, config_hash)
    del backbone

    # 2. Plan shards; skip those already complete.
    plan = shards.plan_shards(g.start_seed, g.num_samples, g.shard_size)
    resolved = config_lib.to_dict(cfg)
    shards.prepare_output(g.output, dataset_hash, resolved, g.overwrite)
    records = {s.index: shards.read_completion(g.output, s) for s in plan}
    todo = [s for s in plan if records[s.index] is None]
    log.info("%d shards planned, %d to build, output %s", len(plan), len(todo), g.output)

    # 3. Ray Data: shard specs -> actor pool (backbone -> decoder -> encode -> write) -> records.
    failed: dict[int, str] = {}
    if todo:
        ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardBuilder,
            batch_size=1,
            compute=ActorPoolStrategy(size=min(g.num_actors, len(todo))),
            num_cpus=g.cpus_per_actor,
            num_gpus=g.gpus_per_actor,
            fn_constructor_kwargs={"cfg": resolved, "config_hash": config_hash},
        )
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            if "failed" in record:
                failed[record["shard"]] = record["failed"]
            else:
                records[record["shard"]] = record  # the completion record the actor just wrote

    # 4. Manifest, last.
    done = [records[s.index] for s in plan if records[s.index] is not None]
    manifest = {
        "format": shards.FORMAT,
        "name": cfg.name,
        "package_version": __version__,
        "build_hash": dataset_hash,
        "config_hash": config_hash,
        "task": cfg.decoder.task,
        "labels": json.loads(meta["labels"]),
        "num_samples": sum(r["count"] for r in done),
        "num_shards": len(plan),
        "complete": len(done) == len(plan),
        "shards": done,
        "failed": [{"shard": s.index, "name": s.name, "error": failed.get(s.index, "not built")}
                   for s in plan if records[s.index] is None],
        "config": resolved,
    }
    shards.write_manifest(g.output, manifest)
    if not manifest["complete"]:
        names = ", ".join(f"{f['name']} ({f['error']})" for f in manifest["failed"][:5])
        raise GenerateError(f"{len(manifest['failed'])} of {len(plan)} shards failed: {names}; re-run to retry them")
    return manifest
