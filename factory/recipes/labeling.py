"""The work of one batch and one shard, free of Ray: seeds (and prompts) -> backbone -> decoder ->
samples -> encoded rows -> shard files and a completion record.

`generate.py` runs these inside Ray Data actors; tests and benchmarks call them directly.
"""

from __future__ import annotations

import time


from factory.backbones import Backbone, BackboneOutput
from factory.config import FactoryConfig
from factory.dataset import layout, writers
from factory.dataset.layout import ShardSpec
from factory.dataset.sample import Sample, encode
from factory.decoders import Decoded, FittedDecoder


def prompts_for(seeds: list[int], texts: list[str] | None, start_seed: int) -> list[str] | None:
    """Seed s takes prompt (s - start_seed) mod len(texts): every prompt in turn, then again."""
    if texts is None:
        return None
    return [texts[(s - start_seed) % len(texts)] for s in seeds]


def samples_from(out: BackboneOutput, labels: Decoded, seeds: list[int], shard: int, cfg: FactoryConfig,
                 config_hash: str, label_names: list[str], prompts: list[str] | None) -> list[Sample]:
    """One batch's backbone and decoder outputs as Samples (arrays, nothing encoded yet)."""
    diffusion = cfg.backbone.diffusion if cfg.backbone.kind == "diffusion" else None
    samples = []
    for i, seed in enumerate(seeds):
        keypoints = None
        if labels.keypoints is not None:
            keypoints = [{"name": name, "x": x, "y": y, "score": s}
                         for name, (x, y, s) in zip(label_names, labels.keypoints[i].tolist())]
        samples.append(Sample(
            seed=seed, shard=shard, image=out.images[i].numpy(), latent=out.latents[i].numpy(),
            uncertainty=float(labels.score[i]), config_hash=config_hash,
            psi=cfg.backbone.psi if diffusion is None else 0.0,
            mask=labels.masks[i].numpy() if labels.masks is not None else None,
            keypoints=keypoints,
            depth=labels.depth[i].numpy() if labels.depth is not None else None,
            depth_scale=cfg.labels.depth_scale if labels.depth is not None else None,
            instances=labels.instance_map[i].numpy() if labels.instance_map is not None else None,
            instance_classes=[{**item, "class": label_names[item["class"]]} for item in labels.instances[i]]
            if labels.instances is not None else None,
            prompt=prompts[i] if prompts else None,
            guidance=diffusion.guidance_scale if diffusion else None,
            steps=diffusion.steps if diffusion else None,
            class_index=out.classes[i] if out.classes is not None else None,
        ))
    return samples


def label_seeds(
    backbone: Backbone, decoder: FittedDecoder, seeds: list[int], shard: int, cfg: FactoryConfig, config_hash: str,
    texts: list[str] | None = None,
) -> list[dict]:
    """Seeds (and their prompts) -> encoded sample rows (SAMPLE_SCHEMA): the whole per-sample work."""
    batch_prompts = prompts_for(seeds, texts, cfg.generate.start_seed)
    out = backbone(seeds, batch_prompts)
    labels = decoder(out.features, (backbone.resolution, backbone.resolution))
    samples = samples_from(out, labels, seeds, shard, cfg, config_hash, decoder.label_names, batch_prompts)
    return [encode(s) for s in samples]


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
    shard_writers = writers.open_writers(g.output, spec, g.formats)
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
                for writer in shard_writers:
                    writer.write(row)
            timings["label_encode_s"] += t1 - t0
            timings["write_s"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        files = [f for writer in shard_writers for f in writer.close()]
        timings["write_s"] += time.perf_counter() - t0
    except BaseException:
        for writer in shard_writers:
            writer.abort()
        raise
    timings["total_s"] = time.perf_counter() - started
    record = layout.completion_record(spec, scores, kept, files, config_hash, timings)
    layout.write_completion(g.output, spec, record)
    return record
