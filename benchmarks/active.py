"""Active annotation on the toy world: does labeling the images `factory annotate suggest` picks beat
labeling more random ones?

    python benchmarks/active.py [--repeats 3] [--first 16] [--added 16] [--pool 500] [--eval-images 200]
        [--steps N] [--downstream 1000] [--segmenter-steps 800] [--held-out 300] [--val-images 100]
        [--quick] [--out benchmarks/results/active.json]

GAN path, on the shipped toy StyleGAN2 with the demo's decoder settings. For each repeat r:

1. first round: `--first` random generated faces (seeds r*1000 on), labeled by the stand-in
   annotator (as a person would label them), the Style Interpreter fitted on them;
2. random arm: `--added` more faces drawn at random from the candidate pool, labeled, and the
   decoder fitted again on all of them;
3. active arm: `--added` faces chosen from the same pool by `annotate suggest` (the fitted
   decoder's uncertainty x distance in backbone features, on Ray Data), labeled, fitted again;
4. each decoder's mIoU against the stand-in annotator on `--eval-images` held-out generated faces
   (seeds 5,000,000 on): the annotator is the reference, since it labeled every training image;
5. what each decoder's labels are worth for training (`--downstream` N > 0): its labels of the N
   generated images the demo's build starts with train the label-quality benchmark's downstream
   segmenter (`protocol.downstream`: `--segmenter-steps`, its step selected on `--val-images` real
   faces), scored on `--held-out` real toy faces and as many shifted ones. Agreement with the
   annotator alone misses what more labels are worth (benchmarks/QUALITY.md: 48 labels agree with it
   no better than 16, and train a better segmenter).

Every fit has the same settings, steps and seed; validation images are off (all labels train), so
both arms train on exactly first + added images. `run(...)` returns the report; the quality
benchmark may call it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import busy_cpu_seconds, git_revision, write_results  # noqa: E402  (benchmarks/machine.py)

EVAL_START = 5_000_000
POOL_START = 100_000


def fit_and_save(cfg) -> dict:
    """Fit the decoder on `train.labeled` in this process (the Ray-free loop `factory train` runs on
    each worker) and save it where `generate.decoder` points."""
    import torch

    from factory import config as config_lib
    from factory.backbones import backbone_identity
    from factory.data.annotations import load_labeled_set
    from factory.decoders.files import save_decoder
    from factory.recipes.train import fit

    labeled = load_labeled_set(cfg.train.labeled)
    model, metrics = fit(cfg, labeled, torch.device("cpu"))
    identity = backbone_identity(cfg.backbone)
    save_decoder(cfg.generate.decoder, model, cfg.decoder, cfg.label_names(), identity.feature_channels,
                 identity.weights_hash, config_lib.to_yaml(cfg))
    return metrics


def generated_images(backbone, seeds: list[int], batch: int) -> np.ndarray:
    """[N, H, W, 3] images of `seeds`, generated in blocks of `batch`."""
    import torch

    with torch.inference_mode():
        return np.concatenate([backbone(seeds[i : i + batch]).images.numpy() for i in range(0, len(seeds), batch)])


def generated_masks(backbone, decoder, seeds: list[int], batch: int) -> np.ndarray:
    """[N, H, W] the decoder's masks of `seeds`, generated in blocks of `batch`."""
    import torch

    size = (backbone.resolution, backbone.resolution)
    with torch.inference_mode():
        return np.concatenate([decoder(backbone(seeds[i : i + batch]).features, size).masks.numpy()
                               for i in range(0, len(seeds), batch)])


def evaluate(cfg, backbone, decoder, eval_seeds: list[int], reference: np.ndarray) -> dict:
    """mIoU of `decoder` against the annotator's masks of `eval_seeds`."""
    from factory.toy import segmenter

    masks = generated_masks(backbone, decoder, eval_seeds, 16)
    per_class = segmenter.iou_per_class(masks, reference, len(cfg.labels.classes))
    return {"miou": segmenter.mean_iou(per_class), "iou": per_class}


def downstream_worth(cfg, backbone, decoder, synthetic, sets: dict, segmenter_steps: int) -> dict:
    """The label-quality benchmark's downstream run on the images of `synthetic` (seeds, images)
    labeled by `decoder`, generated in the build's batches."""
    from protocol import downstream

    seeds, images = synthetic
    masks = generated_masks(backbone, decoder, seeds, cfg.generate.batch_size)
    return downstream(images, masks, sets, len(cfg.labels.classes), segmenter_steps)


def label_and_fit(cfg, eval_seeds, reference, worth=None) -> dict:
    """Label the exported images, fit, score against the annotator (and, with `worth`, downstream)."""
    from factory.backbones import load_backbone
    from factory.decoders.files import load_decoder
    from factory.recipes.annotate import import_labels
    from factory.toy.annotator import annotate_with_segmenter

    annotate_with_segmenter(cfg.annotate.dir)
    import_labels(cfg)
    started = time.perf_counter()
    metrics = fit_and_save(cfg)
    fit_s = round(time.perf_counter() - started, 1)
    backbone, decoder = load_backbone(cfg.backbone), load_decoder(cfg.generate.decoder)
    row = {**evaluate(cfg, backbone, decoder, eval_seeds, reference), "fit_s": fit_s,
           "final_loss": metrics.get("loss")}
    if worth:
        row["downstream"] = worth(cfg, backbone, decoder)
    return row


QUICK = {"repeats": 1, "first": 4, "added": 4, "pool": 32, "eval_images": 32, "steps": 30, "downstream": 32,
         "segmenter_steps": 24, "held_out": 16, "val_images": 8}
"""The smoke run's settings (`--quick`, and `quality.py --quick --active`)."""


def run(repeats: int = 3, first: int = 16, added: int = 16, pool: int = 500, eval_images: int = 200,
        steps: int | None = None, downstream: int = 1000, segmenter_steps: int = 800, held_out: int = 300,
        val_images: int = 100, workdir: str | None = None) -> dict:
    """The measurement (see the module doc); returns the report. `steps` None: the demo's;
    `downstream` 0: no downstream runs."""
    import copy
    from functools import partial

    from protocol import face_sets

    from factory.backbones import load_backbone
    from factory.data import annotations
    from factory.recipes.annotate import add_to_export, export_images
    from factory.recipes.suggest import suggest
    from factory.runtime import init_ray
    from factory.toy import segmenter
    from factory.toy.annotator import SHIPPED_ANNOTATOR
    from factory.toy.demo import demo_config

    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="factory-active-")
    steps = steps or demo_config(workdir).train.steps
    base = demo_config(os.path.join(workdir, "base"), [
        f"annotate.num_images={first}", "train.val_images=0", f"train.steps={steps}",
        f"train.checkpoint_every={steps}", f"annotate.pool_size={pool}", "generate.num_actors=2",
        "generate.cpus_per_actor=0.5"])
    init_ray(base.ray)
    eval_seeds = list(range(EVAL_START, EVAL_START + eval_images))
    annotator, _ = segmenter.load(SHIPPED_ANNOTATOR)
    backbone = load_backbone(base.backbone)
    reference = segmenter.predict(annotator, generated_images(backbone, eval_seeds, 16))
    worth = None
    if downstream:
        seeds = list(range(base.generate.start_seed, base.generate.start_seed + downstream))
        synthetic = (seeds, generated_images(backbone, seeds, base.generate.batch_size))
        sets = face_sets(held_out, val_images)
        worth = partial(downstream_worth, synthetic=synthetic, sets=sets, segmenter_steps=segmenter_steps)
    del backbone

    rows = []
    try:
        for r in range(repeats):
            row: dict = {"repeat": r}

            def arm(name: str):
                cfg = copy.deepcopy(base)
                root = os.path.join(workdir, f"r{r}", name)
                cfg.annotate.dir = os.path.join(root, "annotations")
                cfg.train.labeled = os.path.join(cfg.annotate.dir, "labeled.safetensors")
                cfg.generate.decoder = os.path.join(root, "decoder")
                cfg.annotate.start_seed = r * 1000
                cfg.annotate.pool_start_seed = POOL_START + r * 10_000
                return cfg

            # 1. First round.
            cfg = arm("first")
            export_images(cfg)
            row["first"] = label_and_fit(cfg, eval_seeds, reference, worth)
            first_dir, first_decoder = cfg.annotate.dir, cfg.generate.decoder
            # 2. Random arm: more seeds drawn at random from the pool.
            rnd = arm("random")
            shutil.copytree(first_dir, rnd.annotate.dir)
            rng = np.random.default_rng(r)
            drawn = sorted(int(s) for s in rng.choice(np.arange(rnd.annotate.pool_start_seed,
                                                                 rnd.annotate.pool_start_seed + pool), added,
                                                       replace=False))
            add_to_export(rnd, drawn)
            row["random"] = label_and_fit(rnd, eval_seeds, reference, worth)
            # 3. Active arm: the seeds `annotate suggest` picks with the first round's decoder.
            act = arm("active")
            shutil.copytree(first_dir, act.annotate.dir)
            act.generate.decoder = first_decoder
            started = time.perf_counter()
            record = suggest(act, added, pool)
            row["suggest_s"] = round(time.perf_counter() - started, 1)
            act.generate.decoder = os.path.join(workdir, f"r{r}", "active", "decoder")
            row["active"] = label_and_fit(act, eval_seeds, reference, worth)
            chosen = [im["uncertainty"] for im in record["images"]]
            row["uncertainty"] = {"pool_mean": record["pool_score_mean"], "suggested_mean": float(np.mean(chosen))}
            exported = annotations.read_export(act.annotate.dir)
            row["active"]["seeds"] = [im["seed"] for im in exported["images"][first:]]
            row["random"]["seeds"] = drawn
            row["gain"] = row["active"]["miou"] - row["random"]["miou"]
            print(f"repeat {r}: first {row['first']['miou']:.4f}  random {row['random']['miou']:.4f}  "
                  f"active {row['active']['miou']:.4f}  gain {row['gain']:+.4f}", flush=True)
            if worth:
                row["downstream_gain"] = row["active"]["downstream"]["miou"] - row["random"]["downstream"]["miou"]
                print("  downstream: " + "  ".join(f"{a} {row[a]['downstream']['miou']:.4f}"
                                                    for a in ("first", "random", "active")), flush=True)
            rows.append(row)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    gains = np.array([row["gain"] for row in rows])
    arms = ("first", "random", "active")
    mean = {arm: float(np.mean([row[arm]["miou"] for row in rows])) for arm in arms}
    report = {"settings": {"repeats": repeats, "first": first, "added": added, "pool": pool,
                           "eval_images": eval_images, "steps": steps, "backbone": "pkg://toy_stylegan2.safetensors",
                           "decoder": "interpreter, 10 heads (demo settings)", "reference": "stand-in annotator",
                           "downstream": downstream, "segmenter_steps": segmenter_steps, "held_out": held_out,
                           "val_images": val_images},
              "mean_miou": mean, "mean_gain": float(gains.mean()),
              "gain_std": float(gains.std(ddof=1)) if len(gains) > 1 else None,
              "wins": int((gains > 0).sum()), "repeats": rows}
    if downstream:
        report["mean_downstream_miou"] = {arm: float(np.mean([row[arm]["downstream"]["miou"] for row in rows]))
                                          for arm in arms}
        report["mean_downstream_shifted_miou"] = {
            arm: float(np.mean([row[arm]["downstream"]["shifted_miou"] for row in rows])) for arm in arms}
        report["mean_downstream_gain"] = float(np.mean([row["downstream_gain"] for row in rows]))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--first", type=int, default=16, help="first-round labeled images (default 16)")
    p.add_argument("--added", type=int, default=16, help="images added by each arm (default 16)")
    p.add_argument("--pool", type=int, default=500, help="candidate seeds (default 500)")
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--steps", type=int, help="decoder fit steps (default: the demo's, 1,200)")
    p.add_argument("--downstream", type=int, default=1000,
                   help="generated images each decoder labels for a downstream segmenter (0: none)")
    p.add_argument("--segmenter-steps", type=int, default=800)
    p.add_argument("--held-out", type=int, default=300, help="real faces (and shifted ones) the segmenter is scored on")
    p.add_argument("--val-images", type=int, default=100, help="real faces its step is selected on")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 4+4 images, pool 32, 30 steps")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed after)")
    p.add_argument("--out", default="benchmarks/results/active.json")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    report = run(args.repeats, args.first, args.added, args.pool, args.eval_images, args.steps, args.downstream,
                 args.segmenter_steps, args.held_out, args.val_images, args.workdir)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    busy1 = busy_cpu_seconds()
    if busy0 is not None and busy1 is not None:
        report["machine_busy_cpu_seconds"] = round(busy1 - busy0, 1)
    report["revision"] = git_revision()
    write_results(report, args.out)
    m = report["mean_miou"]
    print(f"mIoU vs the stand-in annotator on {args.eval_images} generated faces, mean of {args.repeats}: "
          f"{args.first} random {m['first']:.4f}; +{args.added} random {m['random']:.4f}; "
          f"+{args.added} suggested {m['active']:.4f}; gain {report['mean_gain']:+.4f} "
          f"(active ahead in {report['wins']} of {args.repeats})")
    if args.downstream:
        d = report["mean_downstream_miou"]
        print(f"downstream mIoU on {args.held_out} real faces ({args.downstream} generated images labeled by each "
              f"decoder): {d['first']:.4f}; {d['random']:.4f}; {d['active']:.4f}; "
              f"gain {report['mean_downstream_gain']:+.4f}")
    return report


if __name__ == "__main__":
    main()
