"""Label quality: the papers' evaluation protocol in miniature, for both paths, on the toy world.

    python benchmarks/quality.py [--quick] [--paths gan,dm] [--num-synthetic 5000] [--eval-images 1000]
        [--out benchmarks/results/quality.json]

Both paths run as `factory demo` runs them, on the shipped toy backbones (32 px), except that the
factory keeps every sample (generate.drop_uncertain=0) so filtering can be measured afterwards:

1. decoder quality: DM path, the perception decoder's mIoU on 200 held-out real toy faces through
   inversion, against their ground truth. GAN path, whose decoder only sees generated images (no
   GAN inversion here): its agreement (mIoU) with the stand-in annotator on 200 generated images.
2. downstream: a small U-Net (`factory.toy.segmenter`, the same settings for every run) trained
   (a) on the 16 real labeled toy faces only (the DM demo's; toy-world ground truth; one run, the
       same for both paths),
   (b) on N synthetic samples from the factory,
   (c) on both (the 16 real ones repeated to make up about a quarter of the images),
   each scored on `--eval-images` held-out real toy faces: IoU per class and mean.
3. filtering: (b) again without the 10% most uncertain samples (by their stored uncertainty).

Chance is the mIoU of guessing each pixel's class by the held-out set's class frequencies (per class
p / (2 - p)). Every mIoU is printed beside it. Seeds: the backbones trained on toy scenes 0-3,999, the
annotator on 2,000,000 on, the 16 real labeled faces are 3,000,000-3,000,015, and the held-out faces
1,000,000 on, so no evaluation image was seen in training.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import busy_cpu_seconds, write_results  # noqa: E402  (benchmarks/machine.py)

EVAL_START = 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny N, few steps (CI)")
    p.add_argument("--paths", default="gan,dm", help="comma-separated: gan, dm (default both)")
    p.add_argument("--num-synthetic", type=int, help="N synthetic samples per path (default 5000; quick 64)")
    p.add_argument("--eval-images", type=int, help="held-out real toy faces (default 1000; quick 48)")
    p.add_argument("--segmenter-steps", type=int, help="steps per downstream fit (default 1200; quick 30)")
    p.add_argument("--workdir", help="where the runs go (default: a temporary folder, removed after)")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    args = p.parse_args(argv)
    quick = args.quick
    args.num_synthetic = args.num_synthetic or (64 if quick else 5000)
    args.eval_images = args.eval_images or (48 if quick else 1000)
    args.segmenter_steps = args.segmenter_steps or (30 if quick else 1200)
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    bad = [s for s in args.paths if s not in ("gan", "dm")]
    if bad:
        p.error(f"--paths: unknown {bad}; choose from gan, dm")
    return args


def path_overrides(args: argparse.Namespace) -> list[str]:
    n = args.num_synthetic
    shard = max(16, -(-n // 4))
    settings = [f"generate.num_samples={n}", f"generate.shard_size={shard}", "generate.drop_uncertain=0.0",
                f"generate.calibration_samples={min(n, 100)}", "ray.num_cpus=4"]
    if args.quick:
        settings += ["train.steps=30", "train.checkpoint_every=30"]
    return settings


def downstream(train_images, train_masks, eval_images, eval_masks, num_classes: int, steps: int) -> dict:
    from factory.toy import segmenter

    cfg = segmenter.SegmenterConfig(num_classes, width=24, levels=3)
    model = segmenter.fit(train_images, train_masks, cfg, segmenter.FitConfig(steps=steps, batch_size=32, lr=2e-3))
    per_class = segmenter.iou_per_class(segmenter.predict(model, eval_images), eval_masks, num_classes)
    return {"miou": segmenter.mean_iou(per_class), "iou": per_class, "train_images": int(len(train_images))}


def run_path(path: str, args: argparse.Namespace, workdir: str, real, held_out) -> dict:
    from factory.data import toyworld
    from factory.dataset.read import iter_samples
    from factory.recipes.generate import generate
    from factory.recipes.train import train
    from factory.toy import segmenter
    from factory.toy.demo import demo_config, prepare_labels

    started = time.perf_counter()
    cfg = demo_config(os.path.join(workdir, path), path_overrides(args), diffusion=path == "dm")
    num_classes = len(toyworld.CLASSES)
    eval_images, eval_masks = held_out
    prepare_labels(cfg)
    train_metrics = train(cfg)
    generate(cfg)
    samples = list(iter_samples(cfg.generate.output))
    images = np.stack([s["image"] for s in samples])
    masks = np.stack([s["mask"] for s in samples])
    scores = np.array([s["uncertainty"] for s in samples], np.float32)
    result: dict = {"num_synthetic": len(samples), "train_metrics": train_metrics}

    # 1. Decoder quality.
    if path == "dm":
        k = min(200, len(eval_images))
        result["decoder"] = {"what": f"decoder vs truth, {k} real faces (inversion)",
                             **decoder_miou_by_inversion(cfg, EVAL_START, k)}
    else:
        from factory.toy.annotator import SHIPPED_ANNOTATOR

        annotator, _ = segmenter.load(SHIPPED_ANNOTATOR)
        k = min(200, len(images))
        per_class = segmenter.iou_per_class(masks[:k], segmenter.predict(annotator, images[:k]), num_classes)
        result["decoder"] = {"what": f"decoder vs stand-in annotator, {k} generated",
                             "miou": segmenter.mean_iou(per_class), "iou": per_class}

    # 2. Downstream: real only, synthetic only, both.  3. Synthetic without the 10% most uncertain.
    real_images, real_masks = real
    repeat = max(1, len(images) // (3 * len(real_images)))
    keep = scores <= np.quantile(scores, 0.9)
    runs = {
        "synthetic": (images, masks),
        "both": (np.concatenate([images, *[real_images] * repeat]), np.concatenate([masks, *[real_masks] * repeat])),
        "synthetic_filtered_10": (images[keep], masks[keep]),
    }
    result["downstream"] = {name: downstream(x, y, eval_images, eval_masks, num_classes, args.segmenter_steps)
                            for name, (x, y) in runs.items()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def decoder_miou_by_inversion(cfg, start: int, count: int) -> dict:
    import torch

    from factory.backbones import load_backbone
    from factory.data import toyworld
    from factory.decoders.files import load_decoder
    from factory.toy import segmenter

    backbone = load_backbone(cfg.backbone)
    decoder = load_decoder(cfg.generate.decoder)
    res = backbone.resolution
    seeds = list(range(start, start + count))
    images, masks = toyworld.arrays(seeds, res)
    prompts = [s.prompt for s in toyworld.render_batch(seeds)]
    predicted = []
    with torch.no_grad():
        for i in range(0, count, 16):
            features = backbone.invert(images[i:i + 16], prompts[i:i + 16], seeds[i:i + 16])
            predicted.append(decoder(features, (res, res)).masks.numpy())
    per_class = segmenter.iou_per_class(np.concatenate(predicted), masks, len(toyworld.CLASSES))
    return {"miou": segmenter.mean_iou(per_class), "iou": per_class}


def print_table(report: dict) -> None:
    classes = report["classes"]
    chance = report["chance"]
    print(f"\nlabel quality on {report['eval_images']} held-out real toy faces (mIoU; chance {chance['miou']:.3f})")
    print(f"{'path':5} {'measure':44} {'mIoU':>6}  " + " ".join(f"{c[:5]:>5}" for c in classes))
    print(f"{'':5} {'chance (class frequencies)':44} {chance['miou']:6.3f}  " + _row(chance["iou"]))
    real = report["real_16"]
    print(f"{'':5} {'downstream: 16 real labeled faces only':44} {real['miou']:6.3f}  " + _row(real["iou"]))
    for path, r in report["paths"].items():
        d = r["decoder"]
        print(f"{path:5} {d['what'][:44]:44} {d['miou']:6.3f}  " + _row(d["iou"]))
        for name, run in r["downstream"].items():
            label = f"downstream: {name} ({run['train_images']} images)"
            print(f"{'':5} {label:44} {run['miou']:6.3f}  " + _row(run["iou"]))


def _row(values: list) -> str:
    return " ".join("    -" if v is None else f"{v:5.2f}" for v in values)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from factory.config import RayConfig
    from factory.data import toyworld
    from factory.runtime import init_ray
    from factory.toy import segmenter

    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="quality-")
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    started_ray = init_ray(RayConfig(num_cpus=4))
    try:
        from factory.toy.demo import DM_LABELED_SEEDS

        resolution = 32  # both shipped backbones
        real = toyworld.arrays(DM_LABELED_SEEDS, resolution)
        held_out = toyworld.arrays(range(EVAL_START, EVAL_START + args.eval_images), resolution)
        num_classes = len(toyworld.CLASSES)
        chance = segmenter.chance_iou(held_out[1], num_classes)
        report = {
            "benchmark": "quality", "quick": args.quick, "classes": toyworld.CLASSES,
            "eval_images": args.eval_images, "num_synthetic": args.num_synthetic,
            "segmenter_steps": args.segmenter_steps, "resolution": resolution,
            "chance": {"miou": segmenter.mean_iou(chance), "iou": chance},
            "real_16": downstream(*real, *held_out, num_classes, args.segmenter_steps),
            "paths": {path: run_path(path, args, workdir, real, held_out) for path in args.paths},
        }
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    report["wall_seconds"] = round(wall, 1)
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    busy1 = busy_cpu_seconds()
    if busy0 is not None and busy1 is not None:
        report["machine_busy_cpu_seconds"] = round(busy1 - busy0, 1)
    print_table(report)
    print(f"\n{wall:.0f} s; results in {args.out}")
    write_results(report, args.out)
    return report


if __name__ == "__main__":
    main()
