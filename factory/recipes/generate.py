"""Generate a labeled dataset on Ray Data.

    1. check inputs      the decoder exists and was fitted on this backbone for these tasks (identities,
                         no model load)
    2. claim the output  build.json, prompts.jsonl, the shard plan; finished shards are skipped
    3. build shards      shard specs -> one actor pool: backbone -> decoder -> filter -> encode ->
                         writers -> completion records; until the drop threshold is fixed, shards are
                         staged unfiltered, and the first ones' scores fix it (calibration.json)
    4. finish staged     staged shards' rows -> filter -> writers (Ray tasks, no models)
    5. publish           a complete build's card (README.md) and preview.png, then the manifest,
                         last, by the driver, from the completion records

Each actor loads the backbone and the fitted decoder once and builds whole shards (the Ray-free work
is in `labeling.py`), so shard files are named from their seed range, written under a temporary name
and published atomically; the completion record written after the data is what resume and the
manifest are built from.
"""

from __future__ import annotations

import json
import logging
import traceback
import warnings
from dataclasses import asdict

import numpy as np
import torch

from factory import __version__, lease, runtime, storage
from factory import config as config_lib
from factory.backbones import backbone_identity, load_backbone
from factory.backbones.contract import BackboneIdentity
from factory.backbones.diffusion import check_prompt_lengths
from factory.config import DecoderConfig, FactoryConfig
from factory.data import prompts
from factory.dataset import layout
from factory.dataset.layout import ShardSpec
from factory.decoders.files import (
    MODEL_FILE,
    keypoint_names,
    load_decoder,
    read_decoder_metadata,
)
from factory.fingerprint import safetensors_fingerprint
from factory.recipes import labeling
from factory.recipes.dataset_card import publish_card

log = logging.getLogger(__name__)


ITEMS_IN_FLIGHT_PER_ACTOR = 2
"""Items (shards) a pool actor holds at once, the one it is making and those queued behind it: the
next one waits in the actor's own queue and starts the moment the last one ends. With one, each shard
waits for the driver's scheduling loop to notice the last one's end and send it; while the actors keep
every core busy that loop runs late, and the actors idled 0.14-0.18 s between shards on 2 cores
(0.005-0.008 s with two; README, Benchmarks). The cost: at a build's end a queued shard can wait
behind a busy actor while another actor is free, once per build, and an actor ready before the others
may take both of the first two shards, so that more shards are staged before the threshold exists
(each finished later from its rows, without the models)."""


class GenerateError(RuntimeError):
    """Generation could not start or some shards failed; the message says which."""


def sample_hash(cfg: FactoryConfig, backbone_hash: str, decoder_dir: str) -> str:
    """Identifies everything a sample's bytes depend on besides its seed (and prompt)."""
    with storage.local_copy(decoder_dir, [MODEL_FILE]) as local:
        decoder_sha = safetensors_fingerprint(f"{local}/{MODEL_FILE}")
    b = cfg.backbone
    # image_features is not keyed: the decoder's feature names fix it, and the decoder is in the hash
    settings = ({"diffusion": {k: v for k, v in asdict(b.diffusion).items() if k != "image_features"}}
                if b.kind == "diffusion"
                else {"psi": b.psi, "rgb_taps": b.rgb_taps, "noise": b.noise, "classes": list(b.classes),
                      "dtype": b.dtype})
    settings["batch_invariant"] = b.batch_invariant
    g = cfg.generate  # speed-ups that may change the last float bits (kernels, fusion), keyed only when on
    settings.update({flag: True for flag in ("compile", "channels_last") if getattr(g, flag)})
    return config_lib.stable_hash({"backbone": backbone_hash, **settings, "decoder": decoder_sha,
                                   "depth_scale": cfg.labels.depth_scale})


def build_hash(cfg: FactoryConfig, sample_config_hash: str, prompts_sha256: str | None = None) -> str:
    """Identifies a whole dataset: sample settings, the prompts, and everything that decides which
    samples land in which shard with which bytes (batching can change the decoder's last float bits)."""
    g = cfg.generate
    return config_lib.stable_hash(
        [sample_config_hash, g.start_seed, g.num_samples, g.shard_size, g.batch_size, sorted(g.formats),
         g.drop_uncertain, g.calibration_samples, prompts_sha256, g.image_format, g.image_quality, g.png_compression]
    )


def fitted_decoder_metadata(url: str) -> dict[str, str]:
    """The metadata of the decoder published at `url` (a local folder or any storage URL)."""
    with storage.local_copy(url, [MODEL_FILE]) as local:
        return read_decoder_metadata(local)


class DecoderMismatch(GenerateError, config_lib.ConfigError):
    """The config does not fit the fitted decoder (another backbone, feature layout or tasks): bad
    input the user fixes in the config (exit 2), not a failed run; still a GenerateError, as it
    stops generation before it starts."""


def check_decoder_fits(meta: dict[str, str], backbone: BackboneIdentity, url: str) -> None:
    """A fitted decoder (its metadata `meta`, published at `url`) fits the configured backbone: the
    same weights hash (computed from the stored weights, so the same in any dtype: a decoder fitted
    in float32 fits a bfloat16 build) and the same feature layout."""
    if meta["backbone_hash"] != backbone.weights_hash:
        raise DecoderMismatch(
            f"decoder {url} was fitted on backbone {meta['backbone_hash'][:12]}, the config builds "
            f"{backbone.weights_hash[:12]}; check backbone.weights / backbone.init_seed or re-train"
        )
    fitted_on = json.loads(meta.get("feature_names", "[]"))
    if fitted_on and fitted_on != backbone.feature_names:
        raise DecoderMismatch(
            f"decoder {url} was fitted on features {fitted_on}, the config taps {backbone.feature_names}; "
            "check backbone.feature_resolutions / rgb_taps (StyleGAN2) or backbone.diffusion.resolution / "
            "feature_steps / feature_blocks / feature_norm / image_features, or re-train"
        )


def fitted_tasks(meta: dict[str, str]) -> list[str]:
    """What the fitted decoder (its metadata `meta`) predicts, as it was trained."""
    saved = json.loads(meta["decoder"])
    if saved["kind"] == "interpreter":
        return [saved.get("task", "segmentation")]
    return list(saved["tasks"])


def check_decoder_tasks(meta: dict[str, str], decoder: DecoderConfig, url: str) -> None:
    """The config's decoder tasks are the fitted decoder's: the manifest and card list the config's
    tasks, the rows hold what the decoder predicts, and the two must agree."""
    fitted, wanted = fitted_tasks(meta), decoder.active_tasks()
    if sorted(fitted) != sorted(wanted):
        key = "decoder.task" if decoder.kind == "interpreter" else "decoder.tasks"
        raise DecoderMismatch(
            f"decoder {url} was fitted for tasks {fitted}, the config's {key} asks for {wanted}; "
            f"set {key} to the fitted tasks or re-train"
        )


def load_models(cfg: FactoryConfig):
    """The backbone and the fitted decoder, once per actor, on the GPU when the actor has one (else
    on as many CPU threads as the actor reserved)."""
    g = cfg.generate
    device = "cuda" if g.gpus_per_actor > 0 else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(g.cpus_per_actor)))
    with storage.local_copy(g.decoder, [MODEL_FILE]) as local:
        decoder = load_decoder(local, device)
    backbone = load_backbone(cfg.backbone, device)
    backbone.accelerate(compile=g.compile, channels_last=g.channels_last)
    return backbone, decoder


class ShardBuilder:
    """Ray Data actor: loads the models once, then turns rows of shard specs into records.

    Calibration runs on these same actors. While the build filters by uncertainty and no threshold is
    fixed yet, a shard is staged: made once, unfiltered, into `_staging/` (`labeling.stage_shard`).
    As soon as the calibration shards (those holding the first `calibration_samples` seeds) are all
    staged, whoever notices first (an actor before its next shard, or the driver) fixes the threshold
    from their scores into calibration.json: a deterministic function of those scores, so concurrent
    writers write the same file. From then on shards are built directly, and each actor finishes the
    shards it staged from their rows (no model runs). No sample is computed twice, and no shard is
    published before the threshold exists.

    A shard that raises is retried `generate.max_retries` times, then reported as failed (with its
    error) instead of failing the whole build: the other shards still finish, and the driver records
    the failure in the manifest and exits non-zero. A failed shard publishes nothing, so a re-run
    builds it again. (An actor that crashes is restarted by Ray, which resubmits the shards it held.)
    """

    def __init__(self, cfg: dict, config_hash: str, threshold: float | None = None) -> None:
        self.cfg = config_lib.from_dict(cfg)
        storage.configure(self.cfg.storage)
        self.backbone, self.decoder = load_models(self.cfg)
        self.config_hash = config_hash
        self.threshold = threshold
        self.texts = prompts.read_texts(self.cfg.generate.output)
        self.staged_here: list[ShardSpec] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for index, start, stop in zip(batch["index"], batch["start_seed"], batch["stop_seed"]):
            spec = ShardSpec(int(index), int(start), int(stop))
            out.append(json.dumps(self.build(spec)))
        return {"record": np.asarray(out, dtype=object)}

    def current_threshold(self) -> float | None:
        """The drop threshold once it is fixed (None while it is not, or when nothing is dropped)."""
        if self.threshold is None and self.cfg.generate.drop_uncertain > 0:
            record = calibrate_if_ready(self.cfg, self.config_hash)
            self.threshold = record["threshold"] if record else None
        return self.threshold

    def build(self, spec: ShardSpec) -> dict:
        attempts = self.cfg.generate.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._build(spec)
            except Exception as e:  # recorded in the manifest and the exit code by the driver
                log.error("shard %s failed (attempt %d of %d):\n%s", spec.name, attempt, attempts,
                          traceback.format_exc())
                error = f"{type(e).__name__}: {e}"
        return {"shard": spec.index, "name": spec.name, "failed": error, "attempts": attempts}

    def _build(self, spec: ShardSpec) -> dict:
        filtering = self.cfg.generate.drop_uncertain > 0
        if filtering and self.current_threshold() is None:
            record = labeling.stage_shard(self.backbone, self.decoder, self.cfg, spec, self.config_hash, self.texts)
            self.staged_here.append(spec)
            if self.current_threshold() is None:  # this shard may have completed the calibration set
                return {**record, "staged": True}
        while self.staged_here:  # the threshold is fixed: finish what this actor staged
            staged = self.staged_here.pop(0)
            if layout.read_completion(self.cfg.generate.output, staged) is None:
                done = labeling.finish_staged(self.cfg, staged, self.config_hash, self.threshold)
                if staged == spec:
                    return done
        return labeling.build_shard(self.backbone, self.decoder, self.cfg, spec, self.config_hash,
                                    self.threshold, self.texts)


def map_on_actors(ds, actor: type, cfg: FactoryConfig, num_items: int, constructor_kwargs: dict):
    """`ds.map_batches(actor)` on the build's actor pool: `generate.num_actors` actors (at most one per
    item), each with `cpus_per_actor` CPUs and `gpus_per_actor` GPUs, one item per call and
    `ITEMS_IN_FLIGHT_PER_ACTOR` calls in flight per actor (its items run one at a time, in the order
    they came). Ray restarts a crashed actor and resubmits its work `max_retries` times (Ray Data's
    default is forever, which would loop on a shard that always kills its actor); Ray 2.60 takes those
    two settings only as `ray_remote_args`, whose deprecation warning is silenced here."""
    from ray.data import ActorPoolStrategy

    g = cfg.generate
    runtime.check_placeable(g.cpus_per_actor, g.gpus_per_actor, "generate.cpus_per_actor / gpus_per_actor")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            actor,
            fn_constructor_kwargs=constructor_kwargs,
            batch_size=1,
            compute=ActorPoolStrategy(size=min(g.num_actors, num_items),
                                      max_tasks_in_flight_per_actor=ITEMS_IN_FLIGHT_PER_ACTOR),
            num_cpus=g.cpus_per_actor,
            num_gpus=g.gpus_per_actor,
            max_restarts=g.max_retries,
            max_task_retries=g.max_retries,
        )


def read_calibration(output: str, config_hash: str) -> dict | None:
    """calibration.json, if it was written for this config."""
    url = storage.join(output, layout.CALIBRATION)
    record = storage.read_json(url) if storage.exists(url) else None
    return record if record is not None and record.get("config_hash") == config_hash else None


def calibration_shards(g) -> list[ShardSpec]:
    """The shards holding the first `calibration_samples` seeds, whose scores fix the threshold."""
    plan = layout.plan_shards(g.start_seed, g.num_samples, g.shard_size)
    return [s for s in plan if s.start_seed < g.start_seed + min(g.calibration_samples, g.num_samples)]


def calibrate_if_ready(cfg: FactoryConfig, config_hash: str) -> dict | None:
    """calibration.json, written now if every calibration shard is staged: the (1 - drop_uncertain)
    quantile of the scores of the first `calibration_samples` seeds, in seed order. A function of
    those scores alone, so the driver and any actor may write it, with the same bytes; only scores
    are read, never samples. None while a calibration shard is not staged yet."""
    g = cfg.generate
    record = read_calibration(g.output, config_hash)
    if record is not None:
        return record
    staged = []
    for spec in calibration_shards(g):
        found = layout.read_staged(g.output, spec)
        if found is None or found["config_hash"] != config_hash:
            return None
        staged.append(found)
    n = min(g.calibration_samples, g.num_samples)
    scores = np.concatenate([np.asarray(r["scores"], dtype=np.float64) for r in staged])[:n]
    record = {
        "drop_fraction": g.drop_uncertain,
        "threshold": float(np.quantile(scores, 1 - g.drop_uncertain)),
        "seeds": [g.start_seed, g.start_seed + n],
        "num_scored": int(scores.size),
        "staged_shards": [r["name"] for r in staged],
        "score_quantiles": {f"p{q}": float(np.quantile(scores, q / 100)) for q in (10, 50, 90, 99)},
        "config_hash": config_hash,
        "seconds": round(sum(r["timings"]["total_s"] for r in staged), 3),  # making the calibration shards
    }
    storage.write_json(storage.join(g.output, layout.CALIBRATION), record)
    log.info("calibration: dropping scores above %.5f (%d seeds scored)", record["threshold"], n)
    if scores.min() == scores.max():
        log.warning("calibration: all %d scores are %.5f, so generate.drop_uncertain=%s drops nothing: the decoder has "
                    "no disagreement to rank samples by (decoder.num_heads=1, or no segmentation head); set "
                    "generate.drop_uncertain=0", n, record["threshold"], g.drop_uncertain)
    return record


def generate(cfg: FactoryConfig, builder: type | None = None, command: str | None = None) -> dict:
    """Build (or resume) the dataset at `generate.output`; returns the manifest.

    `builder` is the Ray Data actor class that builds shards (default `ShardBuilder`); wrappers of
    it can instrument or fault-inject a build. `command` (what was run) is recorded in the card."""
    g = cfg.generate
    storage.configure(cfg.storage)

    # 1. Check inputs: the output can be a folder, the decoder exists and was fitted on this backbone
    #    for the configured tasks.
    if storage.isfile(g.output):
        raise FileExistsError(f"generate.output={g.output} is a file; a dataset is a folder: choose another path")
    meta = fitted_decoder_metadata(g.decoder)
    backbone = backbone_identity(cfg.backbone)
    check_decoder_fits(meta, backbone, g.decoder)
    check_decoder_tasks(meta, cfg.decoder, g.decoder)
    config_hash = sample_hash(cfg, backbone.weights_hash, g.decoder)
    build_prompts, fresh = None, False
    if cfg.backbone.kind == "diffusion":  # resolved once, stored with the dataset, read by the actors
        build_prompts, fresh = prompts.resolve(cfg.prompts, cfg.labels.classes, g.output)
        check_prompt_lengths(cfg.backbone.weights, [p.text for p in build_prompts], prompts.describe_source(cfg.prompts),
                             [p.where for p in build_prompts])
        log.info("%d prompts, e.g. %r", len(build_prompts), build_prompts[0].text)
    dataset_hash = build_hash(cfg, config_hash, prompts.sha256(build_prompts) if build_prompts else None)
    with lease.acquire(g.output, g.lease_seconds) as held:  # one build per output; others are refused
        return _build(cfg, builder, meta, config_hash, dataset_hash, build_prompts, fresh, held, command)


def _build(cfg: FactoryConfig, builder: type | None, meta: dict, config_hash: str, dataset_hash: str,
           build_prompts: list | None, fresh: bool, held: lease.Lease, command: str | None) -> dict:
    """Steps 2-5 of `generate`, under the output's lease."""
    import ray

    g = cfg.generate

    # 2. Claim the output, store the prompts, plan shards, skip those already complete, clear an
    #    interrupted run's debris.
    resolved = config_lib.to_dict(cfg)
    layout.prepare_output(g.output, dataset_hash, resolved, g.overwrite)
    if build_prompts is not None:
        prompts.store(build_prompts, fresh, cfg.prompts, cfg.labels.classes, g.output)
    plan = layout.plan_shards(g.start_seed, g.num_samples, g.shard_size)
    for path in layout.remove_temporaries(g.output):
        log.info("removed %s, left by an interrupted build", path)
    records = layout.read_completions(g.output)
    for name, problems in layout.drop_broken(g.output, records).items():  # never trust a record blindly
        log.warning("%s is rebuilt: %s", name, "; ".join(problems))
        del records[name]
    todo = [s for s in plan if s.name not in records]
    log.info("%d shards planned, %d to build, output %s", len(plan), len(todo), g.output)
    if not todo and storage.exists(storage.join(g.output, layout.MANIFEST)):
        finished = layout.read_manifest(g.output)
        if finished["build_hash"] == dataset_hash and finished["complete"]:
            return finished  # a finished build: nothing to do, nothing written

    # 3. Ray Data: shard specs -> actor pool (backbone -> decoder -> filter -> encode -> writers) ->
    #    records. Until the drop threshold is fixed, shards are staged unfiltered; the calibration
    #    shards' scores fix it (calibration.json), and the actors build directly from then on.
    filtering = g.drop_uncertain > 0
    calibration = calibrate_if_ready(cfg, config_hash) if filtering else None
    wanted = {s.name for s in calibration_shards(g)}
    if filtering and calibration is None and wanted & set(records):  # built with a threshold that is gone now
        raise GenerateError(f"{g.output}/{layout.CALIBRATION} is missing but {', '.join(sorted(wanted & set(records)))} "
                            "were built with its threshold; rebuild the dataset with generate.overwrite=true")
    staged = {name for name, r in layout.read_all_staged(g.output).items()
              if r["config_hash"] == config_hash and name not in records}
    failed: dict[str, str] = {}
    todo = [s for s in todo if s.name not in staged]
    if todo:
        ds = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))
        ds = map_on_actors(ds, builder or ShardBuilder, cfg, len(todo),
                           {"cfg": resolved, "config_hash": config_hash,
                            "threshold": calibration["threshold"] if calibration else None})
        try:
            for row in ds.iter_rows():
                record = json.loads(row["record"])
                if "failed" in record:
                    failed[record["name"]] = record["failed"]
                elif record.get("staged"):
                    staged.add(record["name"])
                else:
                    log.info("%s: %d samples", record["name"], record["count"])
        except Exception as e:  # e.g. an actor that kept crashing after max_retries restarts
            log.error("the build stopped early: %s", e)
            reason = f"not built: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failed.update({s.name: reason for s in todo if s.name not in failed and s.name not in staged})

    # 4. Shards still staged (their actor got no shard after the threshold was fixed): finished here
    #    from their rows, without the models.
    records = layout.read_completions(g.output)
    calibration = calibrate_if_ready(cfg, config_hash) if filtering else None
    for spec in plan:
        if spec.name in staged and spec.name not in records:
            if calibration is None:
                failed[spec.name] = ("staged, waiting for the threshold: calibration shards "
                                     f"{', '.join(sorted(wanted - set(records)))} are not all made; re-run to finish")
                continue
            try:
                labeling.finish_staged(cfg, spec, config_hash, calibration["threshold"])
            except Exception as e:
                failed[spec.name] = f"{type(e).__name__}: {e}"
    records = layout.read_completions(g.output)  # what was published, read back
    if len(records) == len(plan):
        storage.remove_tree(storage.join(g.output, layout.STAGING_DIR))  # no staged rows left to finish

    # 5. Publish: a complete build's card and preview, then the manifest, last.
    tasks = fitted_tasks(meta)
    manifest = layout.build_manifest(
        plan, records, failed,
        name=cfg.name, package_version=__version__, build_hash=dataset_hash, config_hash=config_hash,
        task="segmentation" if "segmentation" in tasks else tasks[0], tasks=tasks,
        labels=json.loads(meta["labels"]), keypoints=keypoint_names(meta), formats=list(g.formats),
        image_format=g.image_format, calibration=calibration, config=resolved,
    )
    held.check()  # a build that lost its lease publishes no card and no manifest
    try:
        if manifest["complete"]:
            publish_card(cfg, manifest, command)
        layout.write_manifest(g.output, manifest)
    except (OSError, storage.StorageError) as e:  # e.g. the disk filled up or turned read-only: a failed run
        reason = (f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror
                  else str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise GenerateError(f"publishing {g.output} failed: {reason}; its shards are kept, re-run to publish it") from None
    if not manifest["complete"]:
        names = ", ".join(f"{f['name']} ({f['error']})" for f in manifest["failed"][:5])
        raise GenerateError(f"{len(manifest['failed'])} of {len(plan)} shards failed: {names}; re-run to retry them")
    return manifest
