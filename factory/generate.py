"""Generate a labeled dataset on Ray Data.

    calibration (first seeds -> scores -> drop threshold)
    shard plan (seed ranges) -> actor pool: backbone -> decoder -> filter -> encode -> shard writers
                             -> completion records -> manifest.json (driver, last)

Each actor loads the backbone and the fitted decoder once and builds whole shards, so shard files
are named from their seed range, written under a temporary name and published atomically; the
completion record it writes after the data is what resume and the manifest are built from.
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

from factory import __version__, prompts, shards, storage
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
    """Identifies everything a sample's bytes depend on besides its seed (and prompt)."""
    with storage.local_copy(decoder_dir, [MODEL_FILE]) as local:
        decoder_sha = safetensors_fingerprint(os.path.join(local, MODEL_FILE))
    b = cfg.backbone
    settings = ({"diffusion": asdict(b.diffusion), "batch_invariant": b.batch_invariant} if b.kind == "diffusion"
                else {"psi": b.psi, "rgb_taps": b.rgb_taps})
    return config_lib.stable_hash({"backbone": backbone_hash, **settings, "decoder": decoder_sha,
                                   "depth_scale": cfg.labels.depth_scale})


def build_hash(cfg: FactoryConfig, sample_config_hash: str, prompts_sha256: str | None = None) -> str:
    """Identifies a whole dataset: sample settings, the prompts, and everything that decides which
    samples land in which shard with which bytes (batching can change the decoder's last float bits)."""
    g = cfg.generate
    return config_lib.stable_hash(
        [sample_config_hash, g.start_seed, g.num_samples, g.shard_size, g.batch_size, sorted(g.formats),
         g.drop_uncertain, g.calibration_samples, prompts_sha256]
    )


def prompt_texts(output: str) -> list[str] | None:
    """The build's prompts (`<output>/prompts.jsonl`), or None for a dataset made without them."""
    url = storage.join(output, prompts.PROMPTS_FILE)
    return [p.text for p in prompts.from_jsonl(url)] if storage.exists(url) else None


def prompts_for(seeds: list[int], texts: list[str] | None, start_seed: int) -> list[str] | None:
    """Seed s takes prompt (s - start_seed) mod len(texts): every prompt in turn, then again."""
    if texts is None:
        return None
    return [texts[(s - start_seed) % len(texts)] for s in seeds]


def png16(depth_m: np.ndarray, scale: float) -> bytes:
    """Metres -> a 16-bit PNG of metres x scale (clipped to 1..65535; 0 stays for unknown)."""
    return png(np.clip(np.round(depth_m * scale), 1, 65535).astype(np.uint16))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def label_seeds(
    backbone: Backbone, decoder: FittedDecoder, seeds: list[int], shard: int, cfg: FactoryConfig, config_hash: str,
    texts: list[str] | None = None,
) -> list[dict]:
    """Seeds (and their prompts) -> encoded sample rows (SAMPLE_SCHEMA): the whole per-sample work,
    free of Ray."""
    batch_prompts = prompts_for(seeds, texts, cfg.generate.start_seed)
    out = backbone(seeds, batch_prompts)
    size = (backbone.resolution, backbone.resolution)
    labels = decoder(out.features, size)
    diffusion = cfg.backbone.diffusion if cfg.backbone.kind == "diffusion" else None
    scale = cfg.labels.depth_scale
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
                "psi": cfg.backbone.psi if diffusion is None else 0.0,
                "width": size[1],
                "height": size[0],
                "image": png(out.images[i].numpy()),
                "mask": png(labels.masks[i].numpy()) if labels.masks is not None else None,
                "keypoints": keypoints,
                "uncertainty": float(labels.score[i]),
                "config_hash": config_hash,
                "prompt": batch_prompts[i] if batch_prompts else None,
                "guidance": diffusion.guidance_scale if diffusion else None,
                "steps": diffusion.steps if diffusion else None,
                "depth": png16(labels.depth[i].numpy(), scale) if labels.depth is not None else None,
                "depth_scale": scale if labels.depth is not None else None,
                "instances": png(labels.instance_map[i].numpy().astype(np.uint8))
                if labels.instance_map is not None else None,
                "instance_classes": json.dumps(
                    [{**item, "class": decoder.label_names[item["class"]]} for item in labels.instances[i]]
                ) if labels.instances is not None else None,
            }
        )
    return rows


def score_seeds(backbone: Backbone, decoder: FittedDecoder, seeds: list[int],
                batch_prompts: list[str] | None = None) -> list[float]:
    """Seeds -> per-sample uncertainty scores, the same numbers `label_seeds` stores."""
    out = backbone(seeds, batch_prompts)
    return decoder(out.features, (backbone.resolution, backbone.resolution)).score.tolist()


def build_shard(
    backbone: Backbone, decoder: FittedDecoder, cfg: FactoryConfig, spec: ShardSpec, config_hash: str,
    threshold: float | None = None, texts: list[str] | None = None,
) -> dict:
    """Generate, encode and publish one shard in every configured format; returns its completion
    record (written last). Samples scoring above `threshold` are dropped."""
    g = cfg.generate
    timings = {"label_encode_s": 0.0, "write_s": 0.0}
    writers = shards.open_writers(g.output, spec, g.formats)
    scores: list[float] = []
    kept = 0
    started = time.perf_counter()
    try:
        seeds = list(spec.seeds)
        for start in range(0, len(seeds), g.batch_size):
            t0 = time.perf_counter()
            rows = label_seeds(backbone, decoder, seeds[start : start + g.batch_size], spec.index, cfg, config_hash, texts)
            t1 = time.perf_counter()
            for row in rows:
                scores.append(row["uncertainty"])
                if threshold is not None and row["uncertainty"] > threshold:
                    continue
                kept += 1
                for writer in writers:
                    writer.write(row)
            timings["label_encode_s"] += t1 - t0
            timings["write_s"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        files = [f for writer in writers for f in writer.close()]
        timings["write_s"] += time.perf_counter() - t0
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    timings["total_s"] = time.perf_counter() - started
    u = np.asarray(scores, dtype=np.float64)
    record = {
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
    shards.write_completion(g.output, spec, record)
    return record


def load_models(cfg: FactoryConfig) -> tuple[Backbone, FittedDecoder]:
    device = "cuda" if cfg.generate.gpus_per_actor > 0 else "cpu"
    return load_backbone(cfg.backbone, device), load_decoder(cfg.generate.decoder, device)


class SeedScorer:
    """Ray Data actor for the calibration pass: rows of seed ranges -> rows of (seed, score)."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = config_lib.from_dict(cfg)
        storage.configure(self.cfg.storage)
        self.backbone, self.decoder = load_models(self.cfg)
        self.texts = prompt_texts(self.cfg.generate.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds = [s for start, stop in zip(batch["start"], batch["stop"]) for s in range(int(start), int(stop))]
        batch_prompts = prompts_for(seeds, self.texts, self.cfg.generate.start_seed)
        return {"seed": np.asarray(seeds, dtype=np.int64),
                "score": np.asarray(score_seeds(self.backbone, self.decoder, seeds, batch_prompts), dtype=np.float64)}


class ShardBuilder:
    """Ray Data actor: loads the models once, then turns rows of shard specs into completion records.

    A shard that raises is retried `generate.max_retries` times, then reported as failed (with its
    error) instead of failing the whole build: the other shards still finish, and the driver records
    the failure in the manifest and exits non-zero. A failed shard publishes nothing, so a re-run
    builds it again. (An actor that crashes is restarted by Ray, which resubmits its shard.)
    """

    def __init__(self, cfg: dict, config_hash: str, threshold: float | None) -> None:
        self.cfg = config_lib.from_dict(cfg)
        storage.configure(self.cfg.storage)
        self.backbone, self.decoder = load_models(self.cfg)
        self.config_hash = config_hash
        self.threshold = threshold
        self.texts = prompt_texts(self.cfg.generate.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for index, start, stop in zip(batch["index"], batch["start_seed"], batch["stop_seed"]):
            spec = ShardSpec(int(index), int(start), int(stop))
            out.append(json.dumps(self.build(spec)))
        return {"record": np.asarray(out, dtype=object)}

    def build(self, spec: ShardSpec) -> dict:
        attempts = self.cfg.generate.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return build_shard(self.backbone, self.decoder, self.cfg, spec, self.config_hash, self.threshold,
                                   self.texts)
            except Exception as e:  # recorded in the manifest and the exit code by the driver
                log.error("shard %s failed (attempt %d of %d):\n%s", spec.name, attempt, attempts,
                          traceback.format_exc())
                error = f"{type(e).__name__}: {e}"
        return {"shard": spec.index, "name": spec.name, "failed": error, "attempts": attempts}


def actor_pool(cfg: FactoryConfig, num_items: int) -> dict:
    """map_batches arguments shared by the calibration and build passes.

    Ray 2.60 has no named parameter for actor restarts, so they travel as `ray_remote_args`; its
    deprecation warning is silenced where `map_batches` is called (see `_map`)."""
    from ray.data import ActorPoolStrategy

    g = cfg.generate
    return {
        "batch_size": 1,
        "compute": ActorPoolStrategy(size=min(g.num_actors, num_items)),
        "num_cpus": g.cpus_per_actor,
        "num_gpus": g.gpus_per_actor,
        # Ray restarts a crashed actor and resubmits its work this many times (Ray Data's default
        # is forever, which would loop on a shard that always kills its actor).
        "max_restarts": g.max_retries,
        "max_task_retries": g.max_retries,
    }


def _map(ds, actor: type, cfg: FactoryConfig, num_items: int, constructor_kwargs: dict):
    """`ds.map_batches` on an actor pool sized and retried from `generate`'s config."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(actor, fn_constructor_kwargs=constructor_kwargs, **actor_pool(cfg, num_items))


def calibrate(cfg: FactoryConfig, config_hash: str) -> dict | None:
    """Fix the uncertainty threshold before the build: score the first `calibration_samples` seeds
    and take the (1 - drop_uncertain) quantile. Only the scores are held, never the samples.
    Stored as calibration.json, so a resumed build reuses it."""
    import ray

    g = cfg.generate
    if g.drop_uncertain == 0:
        return None
    url = storage.join(g.output, shards.CALIBRATION)
    if storage.exists(url):
        record = storage.read_json(url)
        if record.get("config_hash") == config_hash:
            return record
    n = min(g.calibration_samples, g.num_samples)
    chunks = [{"start": s, "stop": min(s + g.batch_size, g.start_seed + n)}
              for s in range(g.start_seed, g.start_seed + n, g.batch_size)]
    t0 = time.perf_counter()
    ds = ray.data.from_items(chunks, override_num_blocks=min(len(chunks), 4 * g.num_actors))
    ds = _map(ds, SeedScorer, cfg, len(chunks), {"cfg": config_lib.to_dict(cfg)})
    result = ds.to_pandas().sort_values("seed")
    scores = result["score"].to_numpy()
    record = {
        "drop_fraction": g.drop_uncertain,
        "threshold": float(np.quantile(scores, 1 - g.drop_uncertain)),
        "seeds": [g.start_seed, g.start_seed + n],
        "num_scored": int(scores.size),
        "score_quantiles": {f"p{q}": float(np.quantile(scores, q / 100)) for q in (10, 50, 90, 99)},
        "config_hash": config_hash,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(url, record)
    log.info("calibration: dropping scores above %.5f (%d seeds scored)", record["threshold"], n)
    return record


def generate(cfg: FactoryConfig, builder: type | None = None) -> dict:
    """Build (or resume) the dataset at `generate.output`; returns the manifest.

    `builder` is the Ray Data actor class that builds shards (default `ShardBuilder`); wrappers of
    it can instrument or fault-inject a build."""
    builder = builder or ShardBuilder
    import ray

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
    del backbone
    build_prompts, fresh, prompts_sha = None, False, None
    if cfg.backbone.kind == "diffusion":  # resolved once, stored with the dataset, read by the actors
        build_prompts, fresh = prompts.resolve(cfg.prompts, cfg.labels.classes, g.output)
        prompts_sha = config_lib.stable_hash([[p.text, list(p.classes)] for p in build_prompts])
        log.info("%d prompts, e.g. %r", len(build_prompts), build_prompts[0].text)
    dataset_hash = build_hash(cfg, config_hash, prompts_sha)

    # 2. Claim the output, plan shards, skip those already complete, clear an interrupted run's debris.
    plan = shards.plan_shards(g.start_seed, g.num_samples, g.shard_size)
    resolved = config_lib.to_dict(cfg)
    shards.prepare_output(g.output, dataset_hash, resolved, g.overwrite)
    if build_prompts is not None:
        prompts_url = storage.join(g.output, prompts.PROMPTS_FILE)
        if fresh or not storage.exists(prompts_url):
            prompts.write_jsonl(build_prompts, prompts_url)
        from_endpoint = cfg.prompts.endpoint and not cfg.prompts.source
        if from_endpoint and (fresh or not storage.exists(storage.join(g.output, prompts.REQUEST_FILE))):
            prompts.write_request_record(cfg.prompts, cfg.labels.classes, g.output)  # vouches for the file
    for path in shards.remove_temporaries(g.output):
        log.info("removed %s, left by an interrupted build", path)
    records = shards.read_completions(g.output)
    todo = [s for s in plan if s.name not in records]
    log.info("%d shards planned, %d to build, output %s", len(plan), len(todo), g.output)
    if not todo and storage.exists(storage.join(g.output, shards.MANIFEST)):
        finished = shards.read_manifest(g.output)
        if finished["build_hash"] == dataset_hash and finished["complete"]:
            return finished  # a finished build: nothing to do, nothing written

    # 3. Calibration pass (fixes the drop threshold), then Ray Data: shard specs -> actor pool
    #    (backbone -> decoder -> filter -> encode -> write) -> completion records.
    calibration = calibrate(cfg, config_hash)  # read back from calibration.json when resuming
    failed: dict[str, str] = {}
    if todo:
        ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
        ds = _map(ds, builder, cfg, len(todo),
                  {"cfg": resolved, "config_hash": config_hash,
                   "threshold": calibration["threshold"] if calibration else None})
        try:
            for row in ds.iter_rows():
                record = json.loads(row["record"])
                if "failed" in record:
                    failed[record["name"]] = record["failed"]
                else:
                    log.info("%s: %d samples", record["name"], record["count"])
        except Exception as e:  # e.g. an actor that kept crashing after max_retries restarts
            log.error("the build stopped early: %s", e)
            reason = f"not built: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failed.update({s.name: reason for s in todo if s.name not in failed})
        records = shards.read_completions(g.output)  # what the actors published, read back

    # 4. Manifest, last.
    done = [records[s.name] for s in plan if s.name in records]
    manifest = {
        "format": shards.FORMAT,
        "name": cfg.name,
        "package_version": __version__,
        "build_hash": dataset_hash,
        "config_hash": config_hash,
        "task": "segmentation" if "segmentation" in cfg.decoder.active_tasks() else cfg.decoder.active_tasks()[0],
        "tasks": cfg.decoder.active_tasks(),
        "labels": json.loads(meta["labels"]),
        "formats": list(g.formats),
        "num_samples": sum(r["count"] for r in done),
        "num_generated": sum(r["generated"] for r in done),
        "num_shards": len(plan),
        "complete": len(done) == len(plan),
        "calibration": calibration,
        "shards": done,
        "failed": [{"shard": s.index, "name": s.name, "error": failed.get(s.name, "not built")}
                   for s in plan if s.name not in records],
        "config": resolved,
    }
    shards.write_manifest(g.output, manifest)
    if not manifest["complete"]:
        names = ", ".join(f"{f['name']} ({f['error']})" for f in manifest["failed"][:5])
        raise GenerateError(f"{len(manifest['failed'])} of {len(plan)} shards failed: {names}; re-run to retry them")
    return manifest

