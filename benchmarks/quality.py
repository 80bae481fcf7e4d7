"""Label quality: the papers' evaluation protocol in miniature, for both paths, on the toy world.

    python benchmarks/quality.py [--quick] [--diagnose] [--levers] [--gan-levers] [--autoencoders W,... [--kid-images 200]] [--active] [--paths gan,dm,dm-sd3] [--num-synthetic 5000]
        [--gan-weights W] [--eval-images 1000] [--val-images 200] [--out benchmarks/results/quality.json]

Both paths run as `factory demo` runs them, on the shipped toy backbones (32 px), except that the
factory keeps every sample (generate.drop_uncertain=0) so filtering can be measured afterwards. A
third path, `dm-sd3`, is the DM path on a toy diffusion transformer instead of the toy UNet
(`--sd3-weights`, default the shipped `pkg://toy_sd3`: the MM-DiT that `factory pretrain
configs/toy_sd3.yaml` trains on the toy world), everything else the DM path's; it is not in the
default `--paths`. `--gan-weights` puts another StyleGAN2 under the GAN path (default the shipped
`pkg://toy_stylegan2.safetensors`), so a candidate generator is measured before it ships:

1. decoder quality: DM paths, the perception decoder's mIoU on 200 held-out real toy faces through
   inversion, against their ground truth. GAN path, whose decoder is fitted on generated images:
   its agreement (mIoU) with the stand-in annotator on 200 generated images, and its mIoU against
   ground truth on `--projection-images` real (and shifted) faces projected into the generator's W+
   (`backbone.invert`, `backbone.inversion_steps` Adam steps per batch of 16).
2. downstream: a small U-Net (`factory.toy.segmenter`, the same settings for every run) trained
   (a) on the 16 real labeled toy faces only (the DM demo's; toy-world ground truth; one run, the
       same for both paths),
   (b) on N synthetic samples from the factory,
   (c) on both (the 16 real ones repeated to make up about a quarter of the images),
   each scored on `--eval-images` held-out real toy faces and on as many faces of a *shifted* toy
   world (SHIFT: smaller faces, stronger roll, harsher light): IoU per class and mean.
3. filtering: (b) again without the 10% most uncertain samples (by their stored uncertainty), and
   what the filter drops: each sample's label against the stand-in annotator's on its image, for the
   dropped, the kept and the worst-agreeing 10%, with the rank correlation of uncertainty and
   agreement (`filter_check`), so a filter that does not pay says why.

One rule for every downstream run (the papers' protocol): train for `--segmenter-steps` (cosine
learning rate) and keep the step whose mIoU on `--val-images` real toy faces is best, scored every
`--segmenter-steps / 12` steps. Those validation faces never enter training and are not the held-out
ones, so 16 images and 5,000 are each stopped where they are best, not after a step count that is
thousands of epochs of one and a few of the other.

`--diagnose` adds the rows that say where the quality goes (about 4x the default's time):
- the ceiling set by the images: the same downstream run on the factory's own images labeled by the
  stand-in annotator instead of the decoder (both paths): "bad labels" against "bad images";
- the filtering curve: 0/10/20/30/50% most uncertain dropped;
- decoder learning curves: the product's own training loop (`factory.recipes.train.fit`, without
  Ray) run 4x the demo's steps, scored at every checkpoint on what the decoder quality row scores
  (GAN: 64 and 256 pixels per head per step; DM: 4 and 8 images per step);
- DM levers: the decoder refitted with one setting changed each (inversion timestep, tapped step,
  cross-attention maps off, decoder width, the image feature off, the training budget, mirrored
  training faces, more inversion noise draws), scored by
  inversion; `--levers` runs these rows alone (minutes: no generation, no downstream runs);
- GAN levers (`--gan-levers`, alone, without Ray): the Style Interpreter at the demo's settings,
  fitted on three times the labels, replaced by DatasetDM's perception decoder on the same features
  and labels, and fitted on the 16 real labeled faces projected into W+ with their true masks; each
  decoder labels the same `--num-synthetic` generated images, scored by its agreement with the
  stand-in annotator, its labels' class shares and the downstream run, beside the 16 real labels
  alone, the annotator's own labels of those images (the ceiling) and their KID;
- backbone quality: KID (kernel inception distance, Binkowski et al. 2018: unbiased MMD^2 with the
  kernel (x.y / d + 1)^3, mean over subsets of 100) between each backbone's images and real toy
  faces, in the feature space of a fixed network: the shipped stand-in annotator's encoder, every
  level average-pooled (`segmenter.embed`), which knows toy faces as Inception knows photos. Two
  disjoint sets of real faces give the noise floor;
- the DM paths' autoencoder ceiling: the validation faces encoded by the backbone's VAE and decoded
  again, scored by the stand-in annotator against their ground truth (beside its score on the
  originals), by PSNR, and by KID: every generated image leaves through that decoder, so what it
  blurs away here no sampler or decoder brings back; `--autoencoders W1,W2,...` runs this row alone
  for the named pipeline folders (or `pkg://` names), side by side, with the KID of `--kid-images`
  images each one generates as the DM path's build samples them (a minute or two per pipeline: no
  Ray, no fits).

Chance is the mIoU of guessing each pixel's class by the held-out set's class frequencies (per class
p / (2 - p)). Seeds: the backbones trained on toy scenes 0-3,999, the annotator on 2,000,000 on, the
16 real labeled faces are 3,000,000-3,000,015, the held-out faces 1,000,000 on, the validation faces
4,000,000 on, the shifted faces 6,000,000 on, so no evaluation image was seen in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import busy_cpu_seconds, write_results  # noqa: E402  (benchmarks/machine.py)
from protocol import EVAL_START, SHIFT_START, downstream, face_sets, shift

FILTER_CURVE = (0.1, 0.2, 0.3, 0.5)
"""--diagnose's filtering curve (the default run drops 10% only); 0% is the plain synthetic run."""
PATHS = {"gan": [], "dm": [], "dm-sd3": []}
"""--paths: each path's settings on top of the demo's (GAN or DM); a "dm*" path is a DM path
(the GAN path's weights come from --gan-weights, dm-sd3's from --sd3-weights)."""
DM_LEVERS = {
    "inversion_timestep=100": ["backbone.diffusion.inversion_timestep=100"],
    "inversion_timestep=300": ["backbone.diffusion.inversion_timestep=300"],
    "feature_steps=[-3] (an earlier, noisier step)": ["backbone.diffusion.feature_steps=[-3]"],
    "attention_maps=false": ["backbone.diffusion.attention_maps=false"],
    "decoder.dim=64 (the built-in width; the demo fuses at 128)": ["decoder.dim=64"],
    "image_features=false (the UNet's maps only)": ["backbone.diffusion.image_features=false"],
    "image_features=false, train.steps=400 (the demo before issue 18's levers)":
        ["backbone.diffusion.image_features=false", "train.steps=400"],
    "train.steps=400": ["train.steps=400"],
    "train.flip=true (the training faces mirrored too)": ["train.flip=true"],
    "train.inversion_draws=2 (two noise draws per training face)": ["train.inversion_draws=2"],
}
"""--diagnose: the DM decoder refitted with one setting changed each, against the demo's."""
GAN_LEVERS = {
    "annotate.num_images=48 (three times the labels)": ["annotate.num_images=48"],
    "decoder.prior_correction=0.5 (class shares calibrated to the labels')": ["decoder.prior_correction=0.5"],
    "backbone.feature_resolutions=[] (every block's maps, the demo before)": ["backbone.feature_resolutions=[]"],
}
"""--gan-levers: the Style Interpreter refitted with one product setting changed each, against the
demo's; two rows built by hand join them (the perception decoder on the same features, and the
interpreter fitted on real labeled faces projected into W+). A lever may change which blocks'
maps the interpreter reads; the images are the same."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny N, few steps (CI)")
    p.add_argument("--diagnose", action="store_true", help="add the diagnosis rows (ceiling, curves, levers, KID)")
    p.add_argument("--levers", action="store_true",
                   help="only the DM levers: the DM decoder refitted with one setting changed each, scored by "
                        "inversion on 200 held-out real faces and 200 shifted ones (16 with --quick)")
    p.add_argument("--gan-levers", action="store_true",
                   help="only the GAN levers: the Style Interpreter at the demo's settings, with more labels, "
                        "replaced by the perception decoder, and fitted on real faces projected into W+; each "
                        "labels --num-synthetic generated images, scored against the stand-in annotator and "
                        "downstream, beside the 16 real labels and the annotator's labels of the same images")
    p.add_argument("--autoencoders",
                   help="only the autoencoder ceiling, for these comma-separated diffusion pipeline folders or "
                        "pkg:// names: the validation faces through each VAE and back, scored by the stand-in "
                        "annotator, PSNR and KID; and the KID of --kid-images images each pipeline generates")
    p.add_argument("--kid-images", type=int,
                   help="--autoencoders: images generated per pipeline for their KID (default 200; quick 32)")
    p.add_argument("--active", action="store_true",
                   help="add active annotation: 16 random + 16 suggested vs 32 random labels (benchmarks/active.py)")
    p.add_argument("--paths", default="gan,dm", help="comma-separated: gan, dm, dm-sd3 (default gan,dm)")
    p.add_argument("--num-synthetic", type=int, help="N synthetic samples per path (default 5000; quick 64)")
    p.add_argument("--eval-images", type=int, help="held-out real toy faces, and shifted ones (default 1000; quick 48)")
    p.add_argument("--val-images", type=int, help="real toy faces that select each run's step (default 200; quick 16)")
    p.add_argument("--segmenter-steps", type=int, help="steps per downstream fit (default 1200; quick 36)")
    p.add_argument("--projection-images", type=int,
                   help="GAN path: real and shifted faces projected into W+ to score its decoder against "
                        "their ground truth (default 64; quick 8; 0: none)")
    p.add_argument("--sd3-weights", default="pkg://toy_sd3",
                   help="the SD3 pipeline folder of the dm-sd3 path (default: the shipped one, which "
                        "configs/toy_sd3.yaml pretrains)")
    p.add_argument("--gan-weights", default="pkg://toy_stylegan2.safetensors",
                   help="the StyleGAN2 of the GAN path, its --gan-levers and its KID (default: the shipped one, "
                        "which configs/toy_gan.yaml pretrains): a candidate generator measured before it ships")
    p.add_argument("--workdir", help="where the runs go (default: a temporary folder, removed after)")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    args = p.parse_args(argv)
    quick = args.quick
    args.num_synthetic = args.num_synthetic or (64 if quick else 5000)
    args.eval_images = args.eval_images or (48 if quick else 1000)
    args.val_images = args.val_images or (16 if quick else 200)
    args.segmenter_steps = args.segmenter_steps or (36 if quick else 1200)
    args.kid_images = args.kid_images or (32 if quick else 200)
    if args.projection_images is None:
        args.projection_images = 8 if quick else 64
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    bad = [s for s in args.paths if s not in PATHS]
    if bad:
        p.error(f"--paths: unknown {bad}; choose from {', '.join(PATHS)}")
    return args


def is_dm(path: str) -> bool:
    return path != "gan"


def path_config(path: str, workdir: str, args: argparse.Namespace, settings: list[str] = ()):
    """The demo's config of `path` (GAN or DM) in workdir/path, with the benchmark's and the path's
    settings, then `settings`."""
    from factory.toy.demo import demo_config

    weights = {"gan": args.gan_weights, "dm-sd3": args.sd3_weights}.get(path)
    weights = [f"backbone.weights={weights}"] if weights else []
    return demo_config(os.path.join(workdir, path), [*path_overrides(args), *PATHS[path], *weights, *settings],
                       diffusion=is_dm(path))


def path_overrides(args: argparse.Namespace) -> list[str]:
    n = args.num_synthetic
    shard = max(16, -(-n // 4))
    settings = [f"generate.num_samples={n}", f"generate.shard_size={shard}", "generate.drop_uncertain=0.0",
                f"generate.calibration_samples={min(n, 100)}", "ray.num_cpus=4"]
    if args.quick:
        settings += ["train.steps=30", "train.checkpoint_every=30", "backbone.inversion_steps=20"]
    return settings


def annotator_labels(images: np.ndarray) -> np.ndarray:
    """The stand-in annotator's masks for generated images (its 0.81 mIoU on real faces makes it the
    proxy for the truth that generated images lack)."""
    from factory.toy import segmenter
    from factory.toy.annotator import SHIPPED_ANNOTATOR

    annotator, _ = segmenter.load(SHIPPED_ANNOTATOR)
    return segmenter.predict(annotator, images)


def annotator_agreement(decoder_masks: np.ndarray, annotated: np.ndarray, num_classes: int) -> dict:
    """mIoU between a decoder's masks and the stand-in annotator's (`annotated`) on the same images."""
    from factory.toy import segmenter

    per_class = segmenter.iou_per_class(decoder_masks, annotated, num_classes)
    return {"miou": segmenter.mean_iou(per_class), "iou": per_class}


def per_sample_miou(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    """mIoU of each pair of masks a[i], b[i] ([N, H, W] class ids), over the classes in either."""
    from factory.toy import segmenter

    return np.array([segmenter.mean_iou(segmenter.iou_per_class(x, y, num_classes)) for x, y in zip(a, b)])


def filter_check(masks: np.ndarray, annotated: np.ndarray, scores: np.ndarray, num_classes: int,
                 fraction: float = 0.1) -> dict:
    """What uncertainty filtering drops, and why it does or does not pay: each synthetic sample's
    label scored against the stand-in annotator's on its image (`annotated`; per-sample mIoU), for
    the `fraction` most uncertain samples (what the filter
    drops), the rest, and the `fraction` the annotator disagrees with most (what a perfect filter
    would drop); Spearman's rho between uncertainty and agreement (a score that finds bad labels is
    strongly negative); and the share of face (non-background) pixels in dropped and kept samples."""
    from scipy.stats import spearmanr

    agreement = per_sample_miou(masks, annotated, num_classes)
    k = max(1, round(fraction * len(scores)))
    dropped, worst = np.zeros(len(scores), bool), np.zeros(len(scores), bool)
    dropped[np.argsort(-scores, kind="stable")[:k]] = True
    worst[np.argsort(agreement, kind="stable")[:k]] = True
    face = (masks != 0).mean((1, 2))
    return {"fraction": fraction, "agreement_dropped": float(agreement[dropped].mean()),
            "agreement_kept": float(agreement[~dropped].mean()), "agreement_worst": float(agreement[worst].mean()),
            "spearman_uncertainty_agreement": float(spearmanr(scores, agreement).statistic),
            "face_share_dropped": float(face[dropped].mean()), "face_share_kept": float(face[~dropped].mean())}


def run_path(path: str, args: argparse.Namespace, workdir: str, real, sets: dict) -> dict:
    from factory.data import toyworld
    from factory.dataset.read import iter_samples
    from factory.recipes.generate import generate
    from factory.recipes.train import train
    from factory.toy.demo import prepare_labels

    started = time.perf_counter()
    cfg = path_config(path, workdir, args)
    num_classes = len(toyworld.CLASSES)
    prepare_labels(cfg)
    train_metrics = train(cfg)
    phases: dict[str, float] = {}

    def phase_done(name: str) -> None:  # seconds since the previous phase ended
        phases[name] = time.perf_counter() - started - sum(phases.values())

    phase_done("labels_and_decoder_fit")
    generate(cfg)
    phase_done("generate")
    samples = list(iter_samples(cfg.generate.output))
    images = np.stack([s["image"] for s in samples])
    masks = np.stack([s["mask"] for s in samples])
    scores = np.array([s["uncertainty"] for s in samples], np.float32)
    annotated = annotator_labels(images)  # for the agreement rows, the filter check and the ceiling
    result: dict = {"num_synthetic": len(samples), "train_metrics": train_metrics}

    # 1. Decoder quality.
    k = min(200, len(images))
    if is_dm(path):
        from factory.backbones import load_backbone
        from factory.decoders.files import load_decoder

        backbone, decoder = load_backbone(cfg.backbone), load_decoder(cfg.generate.decoder)
        result["decoder"] = {"what": f"decoder vs truth, {k} real faces (inversion)",
                             **decoder_miou_by_inversion(backbone, decoder, EVAL_START, k)}
        result["decoder_shifted"] = {"what": f"decoder vs truth, {k} shifted faces (inversion)",
                                     **decoder_miou_by_inversion(backbone, decoder, SHIFT_START, k, shift())}
        if args.diagnose:
            result["decoder_vs_annotator"] = {"what": f"decoder vs stand-in annotator, {k} generated",
                                              **annotator_agreement(masks[:k], annotated[:k], num_classes)}
    else:
        result["decoder"] = {"what": f"decoder vs stand-in annotator, {k} generated",
                             **annotator_agreement(masks[:k], annotated[:k], num_classes)}
        n = args.projection_images
        if n:  # real faces projected into W+ (`backbone.invert`), labeled by the decoder, against truth
            from factory.backbones import load_backbone
            from factory.decoders.files import load_decoder

            backbone, decoder = load_backbone(cfg.backbone), load_decoder(cfg.generate.decoder)
            result["decoder_projected"] = {"what": f"decoder vs truth, {n} real faces (projection)",
                                           **decoder_miou_by_inversion(backbone, decoder, EVAL_START, n, prompted=False)}
            result["decoder_projected_shifted"] = {
                "what": f"decoder vs truth, {n} shifted faces (projection)",
                **decoder_miou_by_inversion(backbone, decoder, SHIFT_START, n, shift(), prompted=False)}

    result["filter_check"] = filter_check(masks, annotated, scores, num_classes)
    phase_done("decoder_quality")

    # 2. Downstream: real only, synthetic only, both.  3. Synthetic without the most uncertain.
    real_images, real_masks = real
    repeat = max(1, len(images) // (3 * len(real_images)))
    runs = {
        "synthetic": (images, masks),
        "both": (np.concatenate([images, *[real_images] * repeat]), np.concatenate([masks, *[real_masks] * repeat])),
    }
    for fraction in FILTER_CURVE if args.diagnose else (0.1,):
        keep = scores <= np.quantile(scores, 1 - fraction)
        runs[f"synthetic_filtered_{round(fraction * 100)}"] = (images[keep], masks[keep])
    if args.diagnose:  # the ceiling: the same images, labeled by the stand-in annotator
        runs["synthetic_annotator_labels"] = (images, annotated)
    result["downstream"] = {name: downstream(x, y, sets, num_classes, args.segmenter_steps)
                            for name, (x, y) in runs.items()}
    if args.diagnose:
        result["decoder_curves"] = decoder_curves(path, args, workdir, sets)
        if path == "dm":  # the levers are the toy UNet's
            result["dm_levers"] = dm_levers(args, workdir)
    phase_done("downstream_and_diagnosis")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["phase_seconds"] = {name: round(value, 1) for name, value in phases.items()}
    return result


def decoder_miou_by_inversion(backbone, decoder, start: int, count: int, world_shift=None,
                              prompted: bool = True) -> dict:
    """The decoder's mIoU against ground truth on `count` real toy faces from seed `start`, each
    inverted into the backbone's features (DM: with its prompt; GAN, `prompted=False`: projected
    into W+)."""
    import torch

    from factory.data import toyworld
    from factory.toy import segmenter

    res = backbone.resolution
    seeds = list(range(start, start + count))
    images, masks = toyworld.arrays(seeds, res, shift=world_shift)
    prompts = [s.prompt for s in toyworld.render_batch(seeds, shift=world_shift)] if prompted else None
    predicted = []
    with torch.no_grad():
        for i in range(0, count, 16):
            features = backbone.invert(images[i:i + 16], prompts and prompts[i:i + 16], seeds[i:i + 16])
            predicted.append(decoder(features, (res, res)).masks.numpy())
    per_class = segmenter.iou_per_class(np.concatenate(predicted), masks, len(toyworld.CLASSES))
    return {"miou": segmenter.mean_iou(per_class), "iou": per_class}


# ----------------------------------------------------------------------------------------------
# --diagnose


def _probe(path: str, cfg, count: int):
    """What a decoder in training is scored on (the decoder-quality row's measure): a function of the
    bare model. GAN: agreement with the stand-in annotator on `count` generated images (seeds from
    generate.start_seed); DM: mIoU against truth on `count` real faces by inversion."""
    from factory.backbones import load_backbone
    from factory.data import toyworld
    from factory.toy import segmenter
    from factory.toy.annotator import SHIPPED_ANNOTATOR

    backbone = load_backbone(cfg.backbone)
    res = backbone.resolution

    def fitted(model):
        return bare_decoder(model, cfg.decoder, cfg.label_names(), backbone.feature_channels)

    if is_dm(path):
        return lambda model: decoder_miou_by_inversion(backbone, fitted(model), EVAL_START, count)["miou"]
    seeds = list(range(cfg.generate.start_seed, cfg.generate.start_seed + count))
    out = [backbone(seeds[i:i + 50]) for i in range(0, count, 50)]
    features = [np.concatenate([o.features[j].numpy() for o in out]) for j in range(len(out[0].features))]
    images = np.concatenate([o.images.numpy() for o in out])
    annotator, _ = segmenter.load(SHIPPED_ANNOTATOR)
    truth = segmenter.predict(annotator, images)

    def agreement(model) -> float:
        import torch

        decoder = fitted(model)
        pred = np.concatenate([decoder([torch.from_numpy(f[i:i + 50]) for f in features], (res, res)).masks.numpy()
                               for i in range(0, count, 50)])
        return segmenter.mean_iou(segmenter.iou_per_class(pred, truth, len(toyworld.CLASSES)))

    return agreement


def bare_decoder(model, decoder_cfg, label_names: list[str], channels: list[int]):
    """A model fitted here, called as the build calls a published decoder (`FittedDecoder`)."""
    from factory.decoders import FittedDecoder

    return FittedDecoder(model.eval(), decoder_cfg, list(label_names), list(channels), "", [])


def fit_decoder(cfg, report=None):
    """The product's training loop (`factory.recipes.train.fit`) on this process's CPU, without Ray."""
    import torch

    from factory.recipes.train import fit, load_training_set

    model, metrics = fit(cfg, load_training_set(cfg), torch.device("cpu"), report=report)
    return model.eval(), metrics


def decoder_curves(path: str, args: argparse.Namespace, workdir: str, sets: dict) -> dict:
    """Held-out decoder quality against training steps, for two batch sizes per step."""
    base = path_config(path, workdir, args)
    steps = base.train.steps * (1 if args.quick else 4)
    every = max(1, steps // 8)
    variants = ({"pixels_64": "train.batch_pixels=64", "pixels_256": "train.batch_pixels=256"} if not is_dm(path)
                else {"images_4": "train.batch_images=4", "images_8": "train.batch_images=8"})
    probe = _probe(path, base, 16 if args.quick else 200)
    curves = {}
    for name, setting in variants.items():
        cfg = path_config(path, workdir, args, [setting, f"train.steps={steps}", f"train.checkpoint_every={every}"])
        points = []

        def report(metrics, model, optimizer, step, points=points):
            points.append({"step": step, "val_miou": metrics.get("val_miou"), "probe_miou": probe(model)})
            model.train()

        fit_decoder(cfg, report)
        curves[name] = points
    return curves


def dm_levers(args: argparse.Namespace, workdir: str) -> dict:
    """The DM decoder refitted (demo steps, without Ray) with one setting changed each, scored by
    inversion on the decoder-quality row's real faces (and the shifted ones)."""
    from factory.backbones import load_backbone
    from factory.toy.demo import demo_config

    count = 16 if args.quick else 200
    rows = {}
    for name, settings in {"demo settings": [], **DM_LEVERS}.items():
        cfg = demo_config(os.path.join(workdir, "dm"), [*path_overrides(args), *settings], diffusion=True)
        model, metrics = fit_decoder(cfg)
        backbone = load_backbone(cfg.backbone)
        decoder = bare_decoder(model, cfg.decoder, cfg.label_names(), backbone.feature_channels)
        real = decoder_miou_by_inversion(backbone, decoder, EVAL_START, count)
        shifted = decoder_miou_by_inversion(backbone, decoder, SHIFT_START, count, shift())["miou"]
        rows[name] = {"settings": settings, "miou": real["miou"], "iou": real["iou"], "shifted_miou": shifted,
                      "val_miou": metrics.get("val_miou")}
    return rows


def gan_levers(args: argparse.Namespace, workdir: str) -> dict:
    """Where the GAN path's labels lose to the 16 real ones: decoders fitted several ways, each
    labeling the same generated images (seeds from generate.start_seed, the build's batches),
    scored against the stand-in annotator on the first 200 and by the benchmark's downstream run."""
    import torch

    from factory.backbones import backbone_identity, load_backbone
    from factory.config import DecoderConfig
    from factory.data import toyworld
    from factory.decoders import build_decoder
    from factory.recipes.objectives import TrainingData, build_interpreter, prepare_data
    from factory.recipes.train import fit_objective, load_training_set
    from factory.toy.demo import DM_LABELED_SEEDS, prepare_labels

    num_classes = len(toyworld.CLASSES)
    sets = face_sets(args.eval_images, args.val_images)
    demo = path_config("gan", workdir, args)
    prepare_labels(demo)
    backbone = load_backbone(demo.backbone)
    channels, size = list(backbone.feature_channels), (backbone.resolution, backbone.resolution)
    every_block = load_backbone(dataclasses.replace(demo.backbone, feature_resolutions=[]))  # the same images

    def fitted(model, decoder_cfg, backbone_cfg):
        """(the decoder as the build calls it, the names of the maps it reads)"""
        identity = backbone_identity(backbone_cfg)
        return bare_decoder(model, decoder_cfg, toyworld.CLASSES, identity.feature_channels), identity.feature_names

    decoders = {"demo settings (16 annotated generated images)": fitted(fit_decoder(demo)[0], demo.decoder,
                                                                        demo.backbone)}
    for i, (name, settings) in enumerate(GAN_LEVERS.items()):
        cfg = path_config("gan", os.path.join(workdir, f"gan-lever-{i}"), args, settings)
        prepare_labels(cfg)
        decoders[name] = fitted(fit_decoder(cfg)[0], cfg.decoder, cfg.backbone)
    data = prepare_data(demo, load_training_set(demo), backbone, torch.device("cpu"))  # the demo's 16
    perception = DecoderConfig(kind="perception", tasks=["segmentation"], num_heads=demo.decoder.num_heads)
    model = build_decoder(perception, channels, num_classes)
    decoders["perception decoder (DatasetDM's) on the same features and labels"] = fitted(
        fit_objective(demo.train, perception_objective(data.features, data.targets, data.train_index, demo), model)[0],
        perception, demo.backbone)
    real_images, real_masks = toyworld.arrays(DM_LABELED_SEEDS, size[0])
    with torch.no_grad():
        projected = backbone.invert(real_images, None, list(range(len(real_images))))
    truth = torch.from_numpy(real_masks).long()
    n_train = len(real_images) - demo.train.val_images
    projected_data = TrainingData(projected, truth, truth, None, list(range(n_train)), [], tuple(truth.shape[1:]))
    model = build_interpreter(demo, channels, num_classes, projected_data)  # as the product's objective builds it
    decoders["interpreter fitted on the 16 real labeled faces projected into W+"] = fitted(
        fit_objective(demo.train, interpreter_objective(projected_data, demo), model)[0], demo.decoder, demo.backbone)

    seeds = list(range(demo.generate.start_seed, demo.generate.start_seed + args.num_synthetic))
    batch = demo.generate.batch_size
    images, labels = [], {name: [] for name in decoders}
    with torch.inference_mode():
        for i in range(0, len(seeds), batch):
            out = every_block(seeds[i:i + batch])
            images.append(out.images.numpy())
            maps = dict(zip(every_block.feature_names, out.features))
            for name, (decoder, read) in decoders.items():
                labels[name].append(decoder([maps[n] for n in read], size).masks.numpy())
    images = np.concatenate(images)
    annotated = annotator_labels(images)
    k = min(200, len(images))

    def shares(masks: np.ndarray) -> list[float]:
        return (np.bincount(masks.ravel(), minlength=num_classes) / masks.size).tolist()

    rows = {}
    for name, parts in labels.items():
        masks = np.concatenate(parts)
        rows[name] = {"agreement": annotator_agreement(masks[:k], annotated[:k], num_classes),
                      "label_shares": shares(masks),
                      "downstream": downstream(images, masks, sets, num_classes, args.segmenter_steps)}
    rows["the same images labeled by the stand-in annotator (the ceiling)"] = {
        "label_shares": shares(annotated), "downstream": downstream(images, annotated, sets, num_classes,
                                                                   args.segmenter_steps)}
    rows["16 real labeled faces only"] = {"label_shares": shares(real_masks),
                                          "downstream": downstream(real_images, real_masks, sets, num_classes,
                                                                   args.segmenter_steps)}
    kid_images = images[:max(args.kid_images, 2)]
    return {"num_synthetic": len(images), "eval_images": args.eval_images, "segmenter_steps": args.segmenter_steps,
            "true_shares_held_out": shares(sets["held_out"][1]), "rows": rows, "kid_images": len(kid_images),
            "kid_generated": backbone_kid(sets, {"GAN generated images": kid_images})}


def interpreter_objective(data, cfg):
    """An objective for `fit_objective`: the Style Interpreter's loss on given training data
    (`objectives.TrainingData`: features and masks; the product's class-balanced pixel sampling and
    pixel loss), no validation images."""
    from factory.recipes.objectives import PixelSampler, loss_on_pixels

    sampler = PixelSampler(data.region, data.train_index, cfg.train.class_balanced)
    return SimpleNamespace(loss=lambda model, gen: loss_on_pixels(model, data, sampler, cfg, gen),
                           evaluate=lambda model: {})


def perception_objective(features: list, targets, train_index: list[int], cfg):
    """An objective for `fit_objective`: the perception decoder's loss on given features and masks
    (the product's loss: `train.batch_images` whole images, `train.class_balanced` weights, each head
    its bootstrap half), no validation images."""
    import torch

    from factory.decoders.perception import Targets, perception_loss
    from factory.recipes.objectives import bootstrap_half, class_weights

    weights = class_weights(targets[train_index], len(cfg.labels.classes)) if cfg.train.class_balanced else None
    size = tuple(targets.shape[1:])

    def step(model, gen):
        pick = [train_index[int(i)] for i in torch.randint(len(train_index), (cfg.train.batch_images,), generator=gen)]
        halves = torch.stack([torch.stack([bootstrap_half(cfg.decoder.init_seed, h, i, size) for i in pick])
                              for h in range(cfg.decoder.num_heads)])
        return perception_loss(model, [f[pick] for f in features],
                               Targets(masks=targets[pick], depth=None, heatmaps=None, instances=None,
                                       class_weights=weights), halves)[0]

    return SimpleNamespace(loss=step, evaluate=lambda model: {})


def kid(x: np.ndarray, y: np.ndarray, subset: int = 100, subsets: int = 50, seed: int = 0) -> float:
    """Kernel inception distance between feature sets [N, D] and [M, D]: the unbiased MMD^2 with the
    polynomial kernel (x.y / D + 1)^3, averaged over random subsets of `subset` rows each."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    n = min(subset, len(x), len(y))
    values = []
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), n, replace=False)], y[rng.choice(len(y), n, replace=False)]
        kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        off = n * (n - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(values))


def backbone_kid(sets: dict, images_by_name: dict) -> dict:
    """KID of each named image set (each path's generated images, a DM path's autoencoder
    reconstructions), and of a second set of real faces (the floor), to the held-out real faces, in
    the stand-in annotator's feature space."""
    from factory.toy import segmenter
    from factory.toy.annotator import SHIPPED_ANNOTATOR

    annotator, _ = segmenter.load(SHIPPED_ANNOTATOR)
    real = segmenter.embed(annotator, sets["held_out"][0])
    rows = {"real (validation faces)": kid(segmenter.embed(annotator, sets["val"][0]), real)}
    if "shifted" in sets:
        rows["real, shifted world"] = kid(segmenter.embed(annotator, sets["shifted"][0]), real)
    for name, images in images_by_name.items():
        rows[name] = kid(segmenter.embed(annotator, images), real)
    return rows


def autoencoder_ceiling(backbone, sets: dict) -> tuple[dict, np.ndarray]:
    """What a diffusion backbone's autoencoder alone does to real faces: the validation faces encoded
    (posterior mean) and decoded again; the stand-in annotator's mIoU against their ground truth on the
    originals and on the reconstructions, and PSNR. Every image the path generates comes out of this
    decoder, so parts it blurs away here no sampler or label brings back: the images' ceiling before
    the denoiser adds its own errors. Returns the row and the reconstructions (for their KID)."""
    import torch

    from factory.backbones.diffusion import pixels
    from factory.data import toyworld
    from factory.toy import segmenter
    from factory.toy.annotator import SHIPPED_ANNOTATOR

    images, masks = sets["val"]
    vae = backbone.pipe.vae
    x = pixels(torch.from_numpy(images))
    with torch.no_grad():
        y = torch.cat([vae.decode(vae.encode(x[i:i + 50].to(vae.device, vae.dtype)).latent_dist.mean).sample.float().cpu()
                       for i in range(0, len(x), 50)]).clamp(-1, 1)
    reconstructed = y.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    annotator, _ = segmenter.load(SHIPPED_ANNOTATOR)
    k = len(toyworld.CLASSES)
    scores = {name: segmenter.iou_per_class(segmenter.predict(annotator, im), masks, k)
              for name, im in (("originals", images), ("reconstructed", reconstructed))}
    mse = float(((y - x) ** 2).mean())
    return {"what": f"{len(images)} validation faces through the autoencoder and back",
            "annotator_miou_originals": segmenter.mean_iou(scores["originals"]),
            "annotator_miou_reconstructed": segmenter.mean_iou(scores["reconstructed"]),
            "iou_reconstructed": scores["reconstructed"], "psnr_db": round(10 * np.log10(4 / mse), 2)}, reconstructed


def autoencoders(args: argparse.Namespace, workdir: str) -> dict:
    """`--autoencoders`: `autoencoder_ceiling` and the reconstructions' KID for each named pipeline,
    beside the KID of the validation faces themselves (the floor)."""
    from factory.backbones import load_backbone

    sets = face_sets(args.eval_images, args.val_images, shifted=False)
    rows, images = {}, {}
    for weights in [w.strip() for w in args.autoencoders.split(",") if w.strip()]:
        cfg = path_config("dm", workdir, args, [f"backbone.weights={weights}"])
        backbone = load_backbone(cfg.backbone)
        rows[weights], images[weights] = autoencoder_ceiling(backbone, sets)
        images[f"{weights} generated"] = generated_images(backbone, cfg, args.kid_images)
    kids = backbone_kid(sets, images)
    for weights, row in rows.items():
        row["kid"], row["kid_generated"] = kids[weights], kids[f"{weights} generated"]
    return {"floor_kid": kids["real (validation faces)"], "generated_images": args.kid_images, "pipelines": rows}


def generated_images(backbone, cfg, count: int) -> np.ndarray:
    """`count` images as the DM path's build samples them: the demo's sampler and prompts, seeds from
    `generate.start_seed`, batches of `generate.batch_size`."""
    import torch

    from factory.data import prompts
    from factory.recipes.labeling import prompts_for

    found, _ = prompts.resolve(cfg.prompts, cfg.label_names(), cfg.generate.output)
    texts = [p.text for p in found]
    seeds = list(range(cfg.generate.start_seed, cfg.generate.start_seed + count))
    step = cfg.generate.batch_size
    with torch.inference_mode():
        return np.concatenate([backbone(seeds[i:i + step], prompts_for(seeds[i:i + step], texts, seeds[0])).images.numpy()
                               for i in range(0, count, step)])


def print_autoencoders(report: dict) -> None:
    a = report["autoencoders"]
    print(f"\nreal faces through each pipeline's autoencoder and back (KID floor {a['floor_kid']:.4f})")
    print(f"(KID gen.: {a['generated_images']} images each pipeline generates with the demo's sampler)")
    print(f"{'pipeline':40} {'annot.':>6} {'PSNR':>5} {'KID':>7} {'gen.':>7}  "
          + " ".join(f"{c[:5]:>5}" for c in report["classes"]))
    for weights, row in a["pipelines"].items():
        print(f"{weights[-40:]:40} {row['annotator_miou_reconstructed']:6.3f} {row['psnr_db']:5.1f} {row['kid']:7.4f} "
              f"{row['kid_generated']:7.4f}  "
              + _row(row["iou_reconstructed"]) + f"  (originals {row['annotator_miou_originals']:.3f})")


def print_table(report: dict) -> None:
    classes = report["classes"]
    chance = report["chance"]
    print(f"\nlabel quality on {report['eval_images']} held-out real toy faces and as many shifted ones (mIoU; "
          f"chance {chance['miou']:.3f}); each downstream run stopped at its best step on {report['val_images']} "
          "validation faces")
    print(f"{'path':5} {'measure':46} {'mIoU':>6} {'shift':>6} {'step':>5}  " + " ".join(f"{c[:5]:>5}" for c in classes))
    print(f"{'':5} {'chance (class frequencies)':46} {chance['miou']:6.3f} {'':6} {'':5}  " + _row(chance["iou"]))
    _print_run("", "downstream: 16 real labeled faces only", report["real_16"])
    for path, r in report["paths"].items():
        for key in ("decoder", "decoder_shifted", "decoder_vs_annotator", "decoder_projected",
                    "decoder_projected_shifted"):
            if key in r:
                print(f"{path:5} {r[key]['what'][:46]:46} {r[key]['miou']:6.3f} {'':6} {'':5}  " + _row(r[key]["iou"]))
        for name, run in r["downstream"].items():
            _print_run("", f"downstream: {name} ({run['train_images']})", run)
        f = r["filter_check"]
        print(f"{path:5} what filtering drops ({f['fraction']:.0%} most uncertain): labels agree with the annotator "
              f"{f['agreement_dropped']:.3f} (kept {f['agreement_kept']:.3f}; the {f['fraction']:.0%} it disagrees with "
              f"most: {f['agreement_worst']:.3f}); Spearman rho uncertainty-agreement "
              f"{f['spearman_uncertainty_agreement']:+.2f}; face pixels {f['face_share_dropped']:.0%} dropped, "
              f"{f['face_share_kept']:.0%} kept")
        if "autoencoder" in r:
            a = r["autoencoder"]
            print(f"{path:5} {'annotator on faces through the autoencoder':46} {a['annotator_miou_reconstructed']:6.3f} "
                  f"{'':6} {'':5}  " + _row(a["iou_reconstructed"]) + f"  (originals {a['annotator_miou_originals']:.3f}, "
                  f"PSNR {a['psnr_db']:.1f} dB)")
        for name, curve in r.get("decoder_curves", {}).items():
            points = " ".join(f"{p['step']}:{p['probe_miou']:.3f}" for p in curve)
            print(f"{path:5} decoder curve {name} (step:mIoU) {points}")
        for name, row in r.get("dm_levers", {}).items():
            print(f"{path:5} {'DM lever: ' + name:46} {row['miou']:6.3f} {row['shifted_miou']:6.3f}")
    for name, value in report.get("kid", {}).items():
        print(f"{'':5} {'KID to held-out real faces: ' + name:46} {value:8.4f}")


def print_levers(report: dict) -> None:
    print("\nthe DM decoder refitted with one setting changed each, mIoU by inversion on real and shifted faces")
    print(f"{'setting':70} {'mIoU':>6} {'shift':>6}  " + " ".join(f"{c[:5]:>5}" for c in report["classes"]))
    for name, row in report["dm_levers"].items():
        print(f"{name[:70]:70} {row['miou']:6.3f} {row['shifted_miou']:6.3f}  " + _row(row["iou"]))


def print_gan_levers(report: dict) -> None:
    g, eye = report["gan_levers"], report["classes"].index("eye")
    print(f"\nthe GAN path's decoders, each labeling the same {g['num_synthetic']} generated images: agreement with "
          f"the stand-in annotator (first 200), the labels' eye share, and the downstream run on {g['eval_images']} "
          f"held-out real faces (and shifted ones); true eye share {g['true_shares_held_out'][eye]:.4f}")
    print(f"{'decoder':70} {'agree':>6} {'eyes':>6} {'mIoU':>6} {'shift':>6}  "
          + " ".join(f"{c[:5]:>5}" for c in report["classes"]))
    for name, row in g["rows"].items():
        agree = f"{row['agreement']['miou']:6.3f}" if "agreement" in row else f"{'':6}"
        d = row["downstream"]
        print(f"{name[:70]:70} {agree} {row['label_shares'][eye]:6.4f} {d['miou']:6.3f} {d['shifted_miou']:6.3f}  "
              + _row(d["iou"]))
    for name, value in g["kid_generated"].items():
        print(f"KID to held-out real faces: {name}: {value:.4f}" + (f" ({g['kid_images']})" if "GAN" in name else ""))


def _print_run(path: str, label: str, run: dict) -> None:
    print(f"{path:5} {label[:46]:46} {run['miou']:6.3f} {run['shifted_miou']:6.3f} {run['selected_step']:5d}  "
          + _row(run["iou"]))


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
    alone = args.levers or args.gan_levers or args.autoencoders  # modes that fit without Ray
    started_ray = False if alone else init_ray(RayConfig(num_cpus=4), training=True)
    try:
        from factory.toy.demo import DM_LABELED_SEEDS

        if args.autoencoders:  # the autoencoder ceiling alone, per pipeline folder
            report = {"benchmark": "quality", "quick": args.quick, "classes": toyworld.CLASSES,
                      "autoencoders": autoencoders(args, workdir)}
            return finish(report, args, busy0, t0)

        if args.gan_levers:  # where the GAN path's labels lose: decoders fitted several ways, one image set
            report = {"benchmark": "quality", "quick": args.quick, "classes": toyworld.CLASSES,
                      "gan_levers": gan_levers(args, workdir)}
            return finish(report, args, busy0, t0)

        if args.levers:  # the DM decoder's levers alone: no downstream sets, no generation
            from factory.toy.demo import demo_config, prepare_labels

            prepare_labels(demo_config(os.path.join(workdir, "dm"), path_overrides(args), diffusion=True))
            report = {"benchmark": "quality", "quick": args.quick, "levers": True, "classes": toyworld.CLASSES,
                      "dm_levers": dm_levers(args, workdir)}
            return finish(report, args, busy0, t0)
        resolution = 32  # both shipped backbones
        real = toyworld.arrays(DM_LABELED_SEEDS, resolution)
        sets = face_sets(args.eval_images, args.val_images, resolution=resolution)
        num_classes = len(toyworld.CLASSES)
        chance = segmenter.chance_iou(sets["held_out"][1], num_classes)
        report = {
            "benchmark": "quality", "quick": args.quick, "diagnose": args.diagnose, "classes": toyworld.CLASSES,
            "eval_images": args.eval_images, "val_images": args.val_images, "num_synthetic": args.num_synthetic,
            "segmenter_steps": args.segmenter_steps, "resolution": resolution, "shift": vars(shift()),
            "chance": {"miou": segmenter.mean_iou(chance), "iou": chance},
            "real_16": downstream(*real, sets, num_classes, args.segmenter_steps),
            "paths": {path: run_path(path, args, workdir, real, sets) for path in args.paths},
        }
        if args.diagnose:
            from factory.backbones import load_backbone
            from factory.dataset.read import iter_samples

            images = {f"{path} backbone": np.stack([s["image"] for s in iter_samples(
                os.path.join(workdir, path, "dataset"), limit=args.eval_images)]) for path in args.paths}
            for path in filter(is_dm, args.paths):  # the images' ceiling set by the autoencoder alone
                backbone = load_backbone(path_config(path, workdir, args).backbone)
                report["paths"][path]["autoencoder"], reconstructed = autoencoder_ceiling(backbone, sets)
                images[f"{path} autoencoder (validation faces reconstructed)"] = reconstructed
            report["kid"] = backbone_kid(sets, images)
        if args.active:  # which 16 images to label next (issue 20); its own runs, its own report
            import active

            report["active_annotation"] = active.run(**(active.QUICK if args.quick else {}))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return finish(report, args, busy0, t0)


def finish(report: dict, args: argparse.Namespace, busy0, t0: float) -> dict:
    """Wall time and machine facts into the report, the table printed, the JSON written."""
    import torch

    wall = time.perf_counter() - t0
    report["wall_seconds"] = round(wall, 1)
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    busy1 = busy_cpu_seconds()
    if busy0 is not None and busy1 is not None:
        report["machine_busy_cpu_seconds"] = round(busy1 - busy0, 1)
    if report.get("levers"):
        print_levers(report)
    elif "gan_levers" in report:
        print_gan_levers(report)
    elif "autoencoders" in report:
        print_autoencoders(report)
    else:
        print_table(report)
    print(f"\n{wall:.0f} s; results in {args.out}")
    write_results(report, args.out)
    return report


if __name__ == "__main__":
    main()
