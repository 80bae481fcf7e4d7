"""Does tapping several denoising steps beat one for the DM decoder? Measured on the toy world.

For each `backbone.diffusion.feature_steps` variant (default: `[-1]`, `[5,-1]`, `[3,6,-1]` of 10
steps), the DM demo's path (`factory demo --diffusion`: the shipped toy pipeline `pkg://toy_diffusion`
at 32 px, its 16 labeled toy faces, the perception decoder) without Ray: the decoder is fitted by
`recipes.train.fit` (the loop each Ray Train worker runs; inversion of the labeled faces to every
tapped step's noise level), saved and loaded as `factory train` publishes it, then scored by inversion
on held-out real toy faces (seeds 1,000,000 on, never trained on) against their ground truth: mIoU,
per class too. Each variant is fitted once per training seed (`--seeds`); the mean and every run are
reported, with the spread, so "clearly better" can be read off.

    python benchmarks/feature_steps.py [--variants="-1;5,-1;3,6,-1"] [--seeds 0,1] [--train-steps 400]
        [--eval-images 200] [--out benchmarks/results/feature_steps.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
from machine import busy_cpu_seconds, git_revision, write_results

EVAL_START = 1_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="-1;5,-1;3,6,-1", help="feature_steps lists, ';'-separated (write --variants=\"-1;5,-1\")")
    p.add_argument("--seeds", default="0,1", help="training seeds (train.seed and the decoder's init)")
    p.add_argument("--train-steps", type=int, default=400, help="decoder steps (the DM demo's)")
    p.add_argument("--eval-images", type=int, default=200, help="held-out real toy faces")
    p.add_argument("--out", default="benchmarks/results/feature_steps.json")
    p.add_argument("overrides", nargs="*", help="config key=value overrides for every variant")
    args = p.parse_args(argv)
    try:
        args.variants = [[int(s) for s in v.split(",")] for v in args.variants.split(";") if v.strip()]
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--variants {args.variants!r} / --seeds {args.seeds!r}: integers, ',' within a variant, ';' between")
    if not args.variants or not args.seeds or min(args.train_steps, args.eval_images) < 1:
        p.error("need at least one variant, one seed, --train-steps >= 1 and --eval-images >= 1")
    return args


def fit_and_score(workdir: str, steps: list[int], seed: int, args: argparse.Namespace) -> dict:
    import torch

    from factory import config as config_lib
    from factory.backbones import backbone_identity
    from factory.decoders.files import load_decoder, save_decoder
    from factory.recipes.train import fit, load_training_set
    from factory.toy.demo import demo_config, prepare_labels

    cfg = demo_config(workdir, [f"backbone.diffusion.feature_steps={steps}", f"train.seed={seed}",
                                f"train.steps={args.train_steps}", f"train.checkpoint_every={args.train_steps}",
                                *args.overrides], diffusion=True)
    if not os.path.exists(cfg.train.labeled):
        prepare_labels(cfg)

    labeled = load_training_set(cfg)
    identity = backbone_identity(cfg.backbone)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, metrics = fit(cfg, labeled, torch.device("cpu"))
    fit_s = time.perf_counter() - t0
    decoder_dir = os.path.join(workdir, f"decoder-{'_'.join(map(str, steps))}-{seed}")
    save_decoder(decoder_dir, model, cfg.decoder, cfg.label_names(), identity.feature_channels,
                 identity.weights_hash, config_lib.to_yaml(cfg), feature_names=identity.feature_names)
    t0 = time.perf_counter()
    score = miou_by_inversion(cfg, load_decoder(decoder_dir), args.eval_images)
    return {"feature_steps": steps, "seed": seed, "feature_names": identity.feature_names,
            "feature_channels": identity.feature_channels, "val_miou_on_4_labeled": metrics.get("val_miou"),
            "fit_s": round(fit_s, 1), "eval_s": round(time.perf_counter() - t0, 1), **score}


def miou_by_inversion(cfg, decoder, count: int) -> dict:
    """The decoder's mIoU on `count` held-out real toy faces by inversion: the quality benchmark's own
    scoring (`quality.decoder_miou_by_inversion`), so the two benchmarks' numbers compare."""
    from quality import decoder_miou_by_inversion

    from factory.backbones import load_backbone

    backbone = load_backbone(cfg.backbone)
    return {**decoder_miou_by_inversion(backbone, decoder, EVAL_START, count), "noise_levels": backbone.noise_levels}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started, busy = time.perf_counter(), busy_cpu_seconds()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-feature-steps-") as workdir:
        for steps in args.variants:
            for seed in args.seeds:
                run = fit_and_score(workdir, steps, seed, args)
                runs.append(run)
                print(f"feature_steps={steps} seed {seed}: mIoU {run['miou']:.3f} on {args.eval_images} held-out "
                      f"faces (fit {run['fit_s']:.0f} s)", flush=True)
    summary = []
    for steps in args.variants:
        values = [r["miou"] for r in runs if r["feature_steps"] == steps]
        summary.append({"feature_steps": steps, "mean_miou": float(np.mean(values)), "min": min(values),
                        "max": max(values), "runs": len(values)})
    print(f"\nDM decoder mIoU by inversion on {args.eval_images} held-out real toy faces, {args.train_steps} steps")
    for s in summary:
        print(f"  feature_steps={s['feature_steps']!s:12} mean {s['mean_miou']:.3f} (min {s['min']:.3f}, "
              f"max {s['max']:.3f}, {s['runs']} seeds)")
    wall = time.perf_counter() - started
    others = None
    if busy is not None:
        others = busy_cpu_seconds() - busy - (time.process_time())  # machine-wide minus (roughly) ours
    report = {"benchmark": "feature_steps", "platform": platform.platform(), "torch": torch.__version__,
              "git": git_revision(), "settings": {"variants": args.variants, "seeds": args.seeds,
                                                  "train_steps": args.train_steps, "eval_images": args.eval_images,
                                                  "overrides": args.overrides},
              "summary": summary, "runs": runs, "cpu_s_used_by_other_processes": others, "wall_s": wall}
    write_results(report, args.out)
    return report


if __name__ == "__main__":
    main()
