"""The work of one batch and one shard, free of Ray: seeds (and prompts) -> backbone -> decoder ->
samples -> encoded rows -> shard files and a completion record.

    model thread:    batch of seeds -> backbone -> decoder -> Samples (arrays) -> filter
    encode threads:  Sample -> row (PNG/WebP/JPEG, JSON), `generate.encode_threads` at a time
    model thread:    rows, in sample order, -> every format's writer; at the end, files published

The model computes batch k+1 while batch k is encoded, so it never waits for encoding; rows are
written in sample order, so shard bytes do not depend on thread timing.

Batches are part of the contract: a shard's seeds go through the model in consecutive blocks of
`generate.batch_size` from the shard's first seed (`shard_batches`), on every path that makes them
(a first build, a rebuild, a calibration shard staged before the threshold is known).

`generate.py` runs these inside Ray Data actors; tests and benchmarks call them directly.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow.parquet as pq
import torch

from factory import storage
from factory.backbones import Backbone, BackboneOutput
from factory.config import FactoryConfig, GenerateConfig
from factory.dataset import layout, writers
from factory.dataset.layout import ShardSpec
from factory.dataset.sample import Codec, Sample, encode
from factory.decoders import Decoded, FittedDecoder

BATCHES_IN_FLIGHT = 2
"""Encoded batches a shard's writer may lag behind the model (bounds memory)."""


def codec_of(g: GenerateConfig) -> Codec:
    return Codec(g.image_format, g.image_quality, g.png_compression)


def shard_batches(spec: ShardSpec, batch_size: int) -> list[list[int]]:
    """The seeds of each forward pass that makes shard `spec`: consecutive blocks from its first seed."""
    seeds = list(spec.seeds)
    return [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]


def batch_of(seed: int, g: GenerateConfig) -> list[int]:
    """The seeds generated together with `seed` in a build of `g` (its shard's block), so that any
    one sample can be regenerated bit for bit: `label_seeds(backbone, decoder, batch_of(s, g), ...)`."""
    if not g.start_seed <= seed < g.start_seed + g.num_samples:
        raise ValueError(f"seed {seed} is not in this build (seeds {g.start_seed} to {g.start_seed + g.num_samples - 1})")
    index = (seed - g.start_seed) // g.shard_size
    first = g.start_seed + index * g.shard_size
    spec = ShardSpec(index, first, min(first + g.shard_size, g.start_seed + g.num_samples))
    return next(b for b in shard_batches(spec, g.batch_size) if seed in b)


def prompts_for(seeds: list[int], texts: list[str] | None, start_seed: int) -> list[str] | None:
    """Seed s takes prompt (s - start_seed) mod len(texts): every prompt in turn, then again."""
    if texts is None:
        return None
    return [texts[(s - start_seed) % len(texts)] for s in seeds]


def samples_from(out: BackboneOutput, labels: Decoded, seeds: list[int], shard: int, cfg: FactoryConfig,
                 config_hash: str, decoder: FittedDecoder, prompts: list[str] | None) -> list[Sample]:
    """One batch's backbone and `decoder`'s outputs `labels` as Samples (arrays, nothing encoded yet)."""
    diffusion = cfg.backbone.diffusion if cfg.backbone.kind == "diffusion" else None
    bad = [seed for seed, score in zip(seeds, labels.score.tolist()) if not math.isfinite(score)]
    if bad:  # NaN features or weights: every label of the sample is garbage, and NaN is no JSON number
        more = f" (and {len(bad) - 1} more of this batch)" if len(bad) > 1 else ""
        raise ValueError(f"the decoder {cfg.generate.decoder} scores seed {bad[0]}{more} as NaN or infinite: its weights "
                         "or the backbone's features are not finite; re-train it or check backbone.dtype")
    samples = []
    for i, seed in enumerate(seeds):
        keypoints = None
        if labels.keypoints is not None:
            keypoints = [{"name": name, "x": x, "y": y, "score": s}
                         for name, (x, y, s) in zip(decoder.keypoint_names, labels.keypoints[i].tolist(), strict=True)]
        samples.append(Sample(
            seed=seed, shard=shard, image=out.images[i].numpy(), latent=out.latents[i].numpy(),
            uncertainty=float(labels.score[i]), config_hash=config_hash,
            psi=cfg.backbone.psi if diffusion is None else 0.0,
            mask=labels.masks[i].numpy() if labels.masks is not None else None,
            keypoints=keypoints,
            depth=labels.depth[i].numpy() if labels.depth is not None else None,
            depth_scale=cfg.labels.depth_scale if labels.depth is not None else None,
            instances=labels.instance_map[i].numpy() if labels.instance_map is not None else None,
            instance_classes=[{**item, "class": decoder.label_names[item["class"]]} for item in labels.instances[i]]
            if labels.instances is not None else None,
            prompt=prompts[i] if prompts else None,
            guidance=diffusion.guidance_scale if diffusion else None,
            steps=diffusion.steps if diffusion else None,
            class_index=out.classes[i] if out.classes is not None else None,
        ))
    return samples


def label_batch(backbone: Backbone, decoder: FittedDecoder, seeds: list[int], shard: int, cfg: FactoryConfig,
                config_hash: str, texts: list[str] | None = None) -> list[Sample]:
    """One forward pass of backbone and decoder over `seeds` (and their prompts) -> Samples."""
    batch_prompts = prompts_for(seeds, texts, cfg.generate.start_seed)
    with torch.inference_mode():
        out = backbone(seeds, batch_prompts)
        labels = decoder(out.features, (backbone.resolution, backbone.resolution))
    return samples_from(out, labels, seeds, shard, cfg, config_hash, decoder, batch_prompts)


def label_seeds(
    backbone: Backbone, decoder: FittedDecoder, seeds: list[int], shard: int, cfg: FactoryConfig, config_hash: str,
    texts: list[str] | None = None,
) -> list[dict]:
    """Seeds (one batch) -> encoded sample rows (SAMPLE_SCHEMA): the whole per-sample work, in one thread."""
    codec = codec_of(cfg.generate)
    return [encode(s, codec) for s in label_batch(backbone, decoder, seeds, shard, cfg, config_hash, texts)]


def score_seeds(backbone: Backbone, decoder: FittedDecoder, seeds: list[int],
                batch_prompts: list[str] | None = None) -> list[float]:
    """Seeds -> per-sample uncertainty scores, the same numbers `label_seeds` stores."""
    with torch.inference_mode():
        out = backbone(seeds, batch_prompts)
        return decoder(out.features, (backbone.resolution, backbone.resolution)).score.tolist()


def _write_in_order(batches: Iterator[tuple[list[float], list[Sample]]], codec: Codec, threads: int,
                    shard_writers: list, timings: dict[str, float]) -> list[float]:
    """Encode the kept samples of each batch on `threads` threads while the next batch is computed,
    and write the rows in sample order; returns every generated sample's score."""
    scores: list[float] = []
    pending: deque[list[Future]] = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            t0 = time.perf_counter()
            rows = [f.result() for f in pending.popleft()]
            t1 = time.perf_counter()
            for row in rows:
                for writer in shard_writers:
                    writer.write(row)
            timings["encode_wait_s"] += t1 - t0
            timings["write_s"] += time.perf_counter() - t1

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode") as pool:
        try:
            while True:
                t0 = time.perf_counter()
                item = next(batches, None)
                timings["model_s"] += time.perf_counter() - t0
                if item is None:
                    break
                batch_scores, kept = item
                scores += batch_scores
                pending.append([pool.submit(encode, s, codec) for s in kept])
                drain(BATCHES_IN_FLIGHT)
            drain(0)
        except BaseException:
            for futures in pending:
                for f in futures:
                    f.cancel()
            raise
    return scores


def _build(backbone: Backbone, decoder: FittedDecoder, cfg: FactoryConfig, spec: ShardSpec, config_hash: str,
           keep: Callable[[float], bool], texts: list[str] | None, shard_writers: list) -> dict:
    """Make shard `spec`'s samples, keep those whose score passes `keep`, write them with
    `shard_writers` and publish; returns (scores, kept count, files, timings)."""
    g = cfg.generate
    timings = {"model_s": 0.0, "encode_wait_s": 0.0, "write_s": 0.0}
    started = time.perf_counter()

    def batches() -> Iterator[tuple[list[float], list[Sample]]]:
        for seeds in shard_batches(spec, g.batch_size):
            samples = label_batch(backbone, decoder, seeds, spec.index, cfg, config_hash, texts)
            yield [s.uncertainty for s in samples], [s for s in samples if keep(s.uncertainty)]

    try:
        scores = _write_in_order(batches(), codec_of(g), g.encode_threads, shard_writers, timings)
        t0 = time.perf_counter()
        files = [f for writer in shard_writers for f in writer.close()]
        timings["publish_s"] = time.perf_counter() - t0
    except BaseException:
        for writer in shard_writers:
            writer.abort()
        raise
    timings["total_s"] = time.perf_counter() - started
    return {"scores": scores, "kept": sum(keep(s) for s in scores), "files": files, "timings": timings}


def build_shard(
    backbone: Backbone, decoder: FittedDecoder, cfg: FactoryConfig, spec: ShardSpec, config_hash: str,
    threshold: float | None = None, texts: list[str] | None = None,
) -> dict:
    """Generate, encode and publish one shard in every configured format; returns its completion
    record (written last). Samples scoring above `threshold` are dropped. A shard staged by the
    calibration pass (`stage_shard`) is finished from its staged rows instead, without the models."""
    g = cfg.generate
    if threshold is not None and layout.read_staged(g.output, spec) is not None:
        return finish_staged(cfg, spec, config_hash, threshold)
    keep = (lambda score: True) if threshold is None else (lambda score: score <= threshold)
    made = _build(backbone, decoder, cfg, spec, config_hash, keep, texts, writers.open_writers(g.output, spec, g.formats))
    record = layout.completion_record(spec, made["scores"], made["kept"], made["files"], config_hash, made["timings"])
    layout.write_completion(g.output, spec, record)
    return record


def stage_shard(backbone: Backbone, decoder: FittedDecoder, cfg: FactoryConfig, spec: ShardSpec, config_hash: str,
                texts: list[str] | None = None) -> dict:
    """The calibration pass's work: make shard `spec` once, unfiltered, into its staged Parquet
    (`_staging/`, not part of the dataset) and return its record with every sample's score. Once the
    threshold is fixed, `build_shard` finishes it from those rows: no sample is computed twice, and
    nothing is published in the dataset before the threshold exists."""
    g = cfg.generate
    staged = [writers.ParquetShardWriter(g.output, layout.staged_file(spec))]
    made = _build(backbone, decoder, cfg, spec, config_hash, lambda score: True, texts, staged)
    record = {"shard": spec.index, "name": spec.name, "start_seed": spec.start_seed, "stop_seed": spec.stop_seed,
              "scores": made["scores"], "files": made["files"], "config_hash": config_hash,
              "timings": {k: round(v, 4) for k, v in made["timings"].items()}}
    layout.write_staged(g.output, spec, record)
    return record


def finish_staged(cfg: FactoryConfig, spec: ShardSpec, config_hash: str, threshold: float) -> dict:
    """A staged shard -> the dataset's shard files (rows scoring above `threshold` dropped) and its
    completion record; then the staged files are removed. The files are the bytes a direct build
    writes, since they hold the same rows in the same order."""
    g = cfg.generate
    staged = layout.read_staged(g.output, spec)
    if staged["config_hash"] != config_hash:
        raise ValueError(f"{layout.staged_file(spec)} was staged for another config ({staged['config_hash'][:12]})")
    started = time.perf_counter()
    shard_writers = writers.open_writers(g.output, spec, g.formats)
    kept = 0
    try:
        fs, path = storage.filesystem(storage.join(g.output, layout.staged_file(spec)))
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    if row["uncertainty"] <= threshold:
                        kept += 1
                        for writer in shard_writers:
                            writer.write(row)
        files = [f for writer in shard_writers for f in writer.close()]
    except BaseException:
        for writer in shard_writers:
            writer.abort()
        raise
    timings = {**staged["timings"], "finish_staged_s": time.perf_counter() - started}
    record = layout.completion_record(spec, staged["scores"], kept, files, config_hash, timings)
    layout.write_completion(g.output, spec, record)
    layout.remove_staged(g.output, spec)
    return record
