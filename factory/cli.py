"""The `factory` command: one verb per recipe. Errors print one line naming what is wrong and exit
non-zero (2: bad input or config, 1: a run that failed)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable

from factory import __version__

log = logging.getLogger("factory")

_CONFIG_HELP = "YAML config file (see configs/); its values overlay the built-in defaults"
_OVERRIDES_HELP = "config overrides as key=value, e.g. train.steps=200 generate.num_samples=5000"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (argparse names the option in front of the error)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


TOY_SIZES = (8, 1024)
"""`factory toyworld --size`: below 8 px a face loses most of its parts (1 px shows none); a scene
takes about 110 MiB to draw at 1024 px."""


def _toy_size(text: str) -> int:
    value = int(text)
    if not TOY_SIZES[0] <= value <= TOY_SIZES[1]:
        raise argparse.ArgumentTypeError(f"must be {TOY_SIZES[0]} to {TOY_SIZES[1]} pixels, got {value}")
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="factory",
        description="A labeled-data factory on Ray: turn a generative backbone plus a few annotated "
        "examples into a sharded, reproducible image + label dataset.",
    )
    p.add_argument("--version", action="version", version=f"factory {__version__}")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="logging level (default INFO)")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    d = sub.add_parser(
        "demo",
        help="run a whole path on the shipped toy backbones",
        description="GAN path (default): export 16 generated toy faces, label them with the stand-in "
        "annotator, import, fit the Style Interpreter on Ray Train, generate a labeled dataset on Ray Data "
        "and inspect it. --diffusion: import 16 labeled toy faces, fit the perception decoder on their "
        "inverted features, generate from template prompts, inspect. Runs on a laptop CPU in a few "
        "minutes; prints where the output is.",
    )
    d.add_argument("--diffusion", action="store_true", help="the DatasetDM path instead of DatasetGAN's")
    d.add_argument("--workdir", help="folder for every output (default ./factory-demo, or ./factory-demo-dm)")
    d.add_argument("overrides", nargs="*", default=[], help=_OVERRIDES_HELP)

    t = sub.add_parser(
        "train",
        help="fit the decoder on the labeled set with Ray Train",
        description="Fit the decoder (train.*) on the labeled set written by `annotate import`, on "
        "Ray Train with train.num_workers workers. Re-running with the same train.run_name resumes "
        "from the last checkpoint. The fitted decoder is written to generate.decoder.",
    )
    g = sub.add_parser(
        "generate",
        help="generate a labeled, sharded dataset with Ray Data",
        description="Generate generate.num_samples labeled samples from consecutive seeds with a "
        "Ray Data actor pool, as Parquet shards under generate.output, then write manifest.json. "
        "Re-running resumes: finished shards are skipped.",
    )
    pt = sub.add_parser(
        "pretrain",
        help="train the backbone itself on a folder of images with Ray Train",
        description="Train backbone.kind (a StyleGAN2 generator against a discriminator, or the tiny "
        "diffusion pipeline: VAE, then a prompt-conditioned UNet) on the images in pretrain.images, "
        "on Ray Train with pretrain.num_workers workers. Re-running with the same pretrain.run_name "
        "resumes from the last checkpoint. The weights are written to pretrain.output with a JSON "
        "record of how they were made.",
    )
    for verb in (t, g, pt):
        verb.add_argument("config", help=_CONFIG_HELP)
        verb.add_argument("overrides", nargs="*", default=[], help=_OVERRIDES_HELP)

    a = sub.add_parser("annotate", help="export images for labeling / import the labels",
                       description="The annotation round trip for the GAN path.")
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    ex = asub.add_parser(
        "export",
        help="write generated images for annotators",
        description="Generate annotate.num_images images from seeds (or one per row of annotate.latents, "
        "your own z or w) into annotate.dir: PNGs under images/, classes.txt, README.txt with labeling "
        "instructions, export.json with each image's seed, latent, class and pixel hash.",
    )
    im = asub.add_parser(
        "import",
        help="validate the annotators' labels into a labeled set",
        description="Read index-mask PNGs from annotate.dir/masks (named like the images) and/or "
        "annotate.dir/coco.json, plus skip.txt; check sizes, class ids and coverage; write "
        "train.labeled. Every problem is listed with its file; nothing is written unless all pass.",
    )
    su = asub.add_parser(
        "suggest",
        help="choose the images to label next with the fitted decoder (active annotation)",
        description="Score a pool of candidates with the fitted decoder (generate.decoder) on Ray Data and "
        "choose --num-images that are uncertain and unlike each other and the labeled ones (uncertainty-"
        "weighted farthest-point sampling on pooled backbone features). GAN path: seeds from "
        "annotate.pool_start_seed, exported into annotate.dir like `annotate export` (images/, export.json), "
        "so `annotate import` takes them with the first round. Diffusion path: the photos in "
        "annotate.candidates, copied into labels.dir/images/. suggested.json lists the choice.",
    )
    su.add_argument("--num-images", type=int, required=True, help="how many images to choose")
    su.add_argument("--pool", type=int, default=None, help="candidates to score (default annotate.pool_size)")
    for verb in (ex, im, su):
        verb.add_argument("config", help=_CONFIG_HELP)
        verb.add_argument("overrides", nargs="*", default=[], help=_OVERRIDES_HELP)

    lab = sub.add_parser("labels", help="import a folder of real labeled images (diffusion path)",
                         description="The diffusion path's training data: real photos with their labels.")
    lsub = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    li = lsub.add_parser(
        "import",
        help="validate a labeled folder into a labeled set",
        description="Read labels.dir (images/, masks/, depth/, instances.json, prompts.jsonl), check "
        "every file against labels.classes and decoder.tasks, resize to backbone.diffusion.resolution "
        "and write train.labeled. Every problem is listed with its file; nothing is written unless all pass.",
    )
    li.add_argument("config", help=_CONFIG_HELP)
    li.add_argument("overrides", nargs="*", default=[], help=_OVERRIDES_HELP)

    pr = sub.add_parser("prompts", help="resolve a build's prompts (file, template or chat endpoint)",
                        description="Prompts for the diffusion path.")
    psub = pr.add_subparsers(dest="action", required=True, metavar="ACTION")
    pe = psub.add_parser(
        "expand",
        help="write the build's prompts next to the dataset, to review before generating",
        description="Resolve prompts.* (a file, a template, or an OpenAI-compatible endpoint asked once) "
        "and write them to generate.output/prompts.jsonl, which `factory generate` then reads.",
    )
    pe.add_argument("config", help=_CONFIG_HELP)
    pe.add_argument("overrides", nargs="*", default=[], help=_OVERRIDES_HELP)

    tw = sub.add_parser(
        "toyworld",
        help="write a folder of toy faces with ground truth (a stand-in for real labeled photos)",
        description="Render seeded toy faces (parts, pose, colours, clutter, occluders) with part masks, "
        "instances, keypoints, depth and prompts, in the layout `factory labels import` reads.",
    )
    tw.add_argument("folder", help="where to write images/, masks/, depth/, instances.json, prompts.jsonl")
    tw.add_argument("--num-images", type=_positive_int, default=100, help="scenes to render (default 100)")
    tw.add_argument("--start-seed", type=_non_negative_int, default=0, help="seed of the first scene (default 0)")
    tw.add_argument("--size", type=_toy_size, default=64,
                    help=f"image size in pixels, {TOY_SIZES[0]} to {TOY_SIZES[1]} (default 64)")

    wt = sub.add_parser("weights", help="convert or inspect StyleGAN2 checkpoints (official pickles, rosinality .pt)",
                        description="StyleGAN2 checkpoints in, read without executing anything from the file.")
    wsub = wt.add_subparsers(dest="action", required=True, metavar="ACTION")
    wc = wsub.add_parser(
        "convert",
        help="write a checkpoint as the project's safetensors plus a JSON record",
        description="Read an official stylegan2-ada-pytorch / stylegan3 networks_stylegan2 pickle, a "
        "rosinality/stylegan2-pytorch .pt, or a project safetensors file, and write its generator as "
        "OUT (.safetensors) with OUT's stem + .json recording the source file, its sha256, the architecture "
        "and the network taken. backbone.weights then takes OUT (or the original file directly).",
    )
    wc.add_argument("source", help="checkpoint file or URL (s3://...)")
    wc.add_argument("out", help="where to write the .safetensors (local path or URL)")
    wc.add_argument("--network", choices=["G_ema", "G"], default="G_ema",
                    help="which generator of a training snapshot (default G_ema, the one every official tool samples)")
    wi = wsub.add_parser(
        "inspect",
        help="print what a weights file holds",
        description="Print a checkpoint's format, the generator taken, its architecture (resolution, "
        "mapping layers, channels, conditioning, conv_clamp, fp16 blocks), w_avg, noise buffers and tensors.",
    )
    wi.add_argument("file", help="checkpoint file or URL")
    wi.add_argument("--network", choices=["G_ema", "G"], default="G_ema", help="which generator of a snapshot")
    wi.add_argument("--json", action="store_true", help="print as JSON")
    for verb in (wc, wi):
        verb.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// URLs (storage.endpoint_url)")
        verb.add_argument("--region", default=None, help="S3 region (storage.region)")
        verb.add_argument("--anonymous", action="store_true", help="read a public bucket without credentials")

    i = sub.add_parser(
        "inspect",
        help="summarize a dataset and draw a preview",
        description="Print a dataset's manifest summary, failed shards, label statistics and "
        "uncertainty histogram, and write a preview PNG of images with their labels overlaid.",
    )
    i.add_argument("dataset", help="dataset folder or URL (the generate.output of a build), or ROOT@latest "
                   "for the newest published version under a nightly root")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--preview", default=None, help="where to write the preview PNG (default DATASET/preview.png)")
    i.add_argument("--samples", type=_positive_int, default=2000, help="samples read for label statistics (default 2000)")
    i.add_argument("--no-verify", action="store_true",
                   help="check file sizes only, not every file's sha256 against its completion record")
    i.add_argument("--html", default=None, metavar="OUT.html",
                   help="also write a self-contained HTML report (preview with labels and legend, class "
                   "frequencies, uncertainty histogram, shards, failures, decoder metrics; no server needed)")
    i.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// datasets (storage.endpoint_url)")
    i.add_argument("--region", default=None, help="S3 region (storage.region)")
    i.add_argument("--anonymous", action="store_true", help="read a public bucket without credentials")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("factory: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`factory weights inspect F | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 1
    except Exception as e:
        code = error_exit("factory", e)
        if code is None:
            raise
        return code


def error_exit(prog: str, e: Exception) -> int | None:
    """Print `e` as one line, `PROG: error: ...`, and return its exit code (2: bad input, 1: a failed
    run); the CLI and the Ray jobs (`jobs/*.py`) share it. None, printing nothing, for an exception
    not known here: a bug, which the caller raises again with its traceback."""
    code = _exit_code(e)
    if code is not None:
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
    return code


def run_job(prog: str, description: str, main: Callable, argv: list[str]) -> None:
    """A Ray job's entry point (`jobs/*.py`): `PROG CONFIG [key=value ...]` parsed as the CLI's verbs
    take them, `main(cfg)` run, its errors printed as the CLI prints them (one line, exit 2 or 1; a bug
    keeps its traceback)."""
    from factory import config as config_lib
    from factory.runtime import check_outputs_outlive_the_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("config", help=_CONFIG_HELP)
    p.add_argument("overrides", nargs="*", default=[], help=_OVERRIDES_HELP)
    args = p.parse_args(argv)
    try:
        cfg = config_lib.load_config(args.config, args.overrides)
        check_outputs_outlive_the_job(cfg)
        main(cfg)
    except Exception as e:
        code = error_exit(prog, e)
        if code is None:
            raise
        sys.exit(code)


def _message(e: Exception) -> str:
    """What to print for `e`: the OS's "Not a directory" rewritten to name the file in the way."""
    if isinstance(e, NotADirectoryError) and e.filename is not None:
        path = os.fspath(e.filename)
        blocker = next((p for p in _parents(path) if os.path.exists(p) and not os.path.isdir(p)), path)
        return f"{blocker}: a file is in the way; a folder is needed there (for {path})"
    return str(e)


def _parents(path: str) -> list[str]:
    """`path` and the folders above it, outermost first."""
    out = [path]
    while os.path.dirname(out[-1]) not in ("", out[-1]):
        out.append(os.path.dirname(out[-1]))
    return out[::-1]


def _exit_code(e: Exception) -> int | None:
    """2 for bad input the user can fix, 1 for a run that failed; None lets a bug show its traceback."""
    from factory.config import ConfigError
    from factory.data.annotations import AnnotationError
    from factory.data.image_folder import ImageFolderError
    from factory.lease import LeaseError
    from factory.recipes.generate import GenerateError
    from factory.recipes.ray_train import TrainError
    from factory.storage import StorageError

    if isinstance(e, (ConfigError, AnnotationError, ImageFolderError, FileNotFoundError, FileExistsError,
                      NotADirectoryError, StorageError)):
        return 2
    if isinstance(e, (TrainError, GenerateError, LeaseError)):  # LeaseError: another build holds the output
        return 1
    if isinstance(e, ValueError):
        return 2
    return None


def _run(args: argparse.Namespace) -> int:
    from factory import config as config_lib
    from factory import storage
    from factory.config import ConfigError

    if args.verb == "inspect":
        return _inspect(args)
    if args.verb == "weights":
        return _weights(args)
    if args.verb == "toyworld":
        from factory.data.toyworld import CLASSES, KEYPOINTS, write_folder

        write_folder(args.folder, args.num_images, args.start_seed, args.size)
        print(f"wrote {args.num_images} labeled faces to {args.folder} (classes {CLASSES}, keypoints {KEYPOINTS})")
        return 0
    if args.verb == "demo":
        from factory.toy.demo import demo_config

        if args.workdir is not None and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
            raise ConfigError(f"--workdir {args.workdir}: a file is in the way; the demo writes a folder there")
        workdir = args.workdir or ("factory-demo-dm" if args.diffusion else "factory-demo")
        cfg = demo_config(workdir, args.overrides, diffusion=args.diffusion)
    else:
        cfg = config_lib.load_config(args.config, args.overrides)
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    from factory.runtime import check_outputs_outlive_the_job

    check_outputs_outlive_the_job(cfg)  # `ray job submit --working-dir . -- factory ...`
    storage.configure(cfg.storage)
    started = time.perf_counter()

    if args.verb == "demo":
        from factory.recipes import inspect
        from factory.toy.demo import run_demo

        _check_backbone(cfg)  # a missing file or a tap the generator lacks fails in a second, before Ray starts
        summary = run_demo(cfg, command=shlex.join(
            ["factory", "demo", *(["--diffusion"] if args.diffusion else []),
             *(["--workdir", args.workdir] if args.workdir else []), *args.overrides]))
        print(inspect.format_summary(summary))
        print(f"decoder   {cfg.generate.decoder}  {_metrics(summary['train_metrics'])}")
        print(f"preview   {summary['preview']}")
        print(f"done in {time.perf_counter() - started:.0f} s; read the shards with pyarrow, e.g.\n"
              f"  python -c \"import pyarrow.parquet as pq; print(pq.read_table('{cfg.generate.output}/parquet'))\"")
    elif args.verb == "annotate" and args.action == "export":
        from factory.data.annotations import read_export
        from factory.recipes.annotate import export_images

        out = export_images(cfg)
        print(f"exported {len(read_export(out)['images'])} images to {out}; label them as {out}/README.txt says, "
              f"then run: {shlex.join(['factory', 'annotate', 'import', args.config, *args.overrides])}")
    elif args.verb == "annotate" and args.action == "suggest":
        from factory.recipes.suggest import check_inputs, suggest
        from factory.runtime import init_ray

        if args.num_images < 1 or (args.pool is not None and args.pool < 1):
            raise ConfigError(f"--num-images and --pool must be >= 1, got {args.num_images} and {args.pool}")
        _check_backbone(cfg)
        checked = check_inputs(cfg, args.num_images, args.pool)  # bad input fails before a cluster starts
        init_ray(cfg.ray)
        record = suggest(cfg, args.num_images, args.pool, checked)
        where = cfg.labels.dir if cfg.backbone.kind == "diffusion" else cfg.annotate.dir
        verb = "labels" if cfg.backbone.kind == "diffusion" else "annotate"
        print(f"suggested {len(record['images'])} of {record['pool_scored']} candidates into {where} "
              f"({', '.join(r['file'] for r in record['images'][:8])}{' ...' if len(record['images']) > 8 else ''}); "
              f"label them, then run: {shlex.join(['factory', verb, 'import', args.config, *args.overrides])}")
    elif args.verb == "annotate":
        from factory.recipes.annotate import import_labels

        labeled = import_labels(cfg)
        print(f"imported {len(labeled.files)} labeled images into {cfg.train.labeled}")
    elif args.verb == "labels":
        from factory.data.labeled_photos import import_labels

        labeled = import_labels(cfg)
        print(f"imported {len(labeled.files)} labeled images ({', '.join(labeled.tasks)}) into {cfg.train.labeled}")
    elif args.verb == "prompts":
        from factory.data import prompts

        from factory.backbones.diffusion import check_prompt_lengths

        if cfg.backbone.kind != "diffusion":
            raise ConfigError(f"prompts expand is for the diffusion path (backbone.kind: diffusion); this config's "
                              f"backbone.kind is {cfg.backbone.kind!r}, whose images come from seeds, not prompts")
        rows, fresh = prompts.resolve(cfg.prompts, cfg.labels.classes, cfg.generate.output)
        check_prompt_lengths(cfg.backbone.weights, [r.text for r in rows], prompts.describe_source(cfg.prompts),
                             [r.where for r in rows])
        prompts.store(rows, fresh, cfg.prompts, cfg.labels.classes, cfg.generate.output)
        print(f"{len(rows)} prompts in {storage.join(cfg.generate.output, prompts.PROMPTS_FILE)}, e.g. {rows[0].text!r}")
    elif args.verb == "train":
        from factory.recipes.train import check_inputs, train
        from factory.runtime import init_ray

        checked = check_inputs(cfg)  # bad input fails in a second, before a cluster starts
        init_ray(cfg.ray, training=True)
        metrics = train(cfg, checked)
        print(f"decoder written to {cfg.generate.decoder}  {_metrics(metrics)}")
    elif args.verb == "pretrain":
        from factory.data.image_folder import load_image_folder
        from factory.recipes.pretrain import pretrain, resolution_of
        from factory.runtime import init_ray

        # every bad image named in seconds, before a cluster starts; the recipe takes what was read
        data = load_image_folder(cfg.pretrain.images, resolution_of(cfg)) if cfg.pretrain.images else None
        init_ray(cfg.ray, training=True)
        record = pretrain(cfg, command=shlex.join(["factory", "pretrain", args.config, *args.overrides]), data=data)
        print(f"{cfg.backbone.kind} written to {cfg.pretrain.output} after {record['steps']} steps  "
              f"{_metrics(record['final_losses'])}")
    elif args.verb == "generate":
        from factory.recipes.generate import generate
        from factory.runtime import init_ray

        init_ray(cfg.ray)
        manifest = generate(cfg, command=shlex.join(["factory", "generate", args.config, *args.overrides]))
        print(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards at {cfg.generate.output} "
              f"({time.perf_counter() - started:.0f} s)")
    return 0


def _check_backbone(cfg) -> None:
    """The backbone's weights and taps, checked in a second (its identity) before a cluster starts."""
    from factory.backbones import backbone_identity
    from factory.config import ConfigError

    try:
        backbone_identity(cfg.backbone)
    except FileNotFoundError as e:
        raise ConfigError(f"backbone.weights: {e}") from None


def _inspect(args: argparse.Namespace) -> int:
    from factory import storage
    from factory.config import StorageConfig
    from factory.dataset import versions
    from factory.recipes import inspect

    storage.configure(StorageConfig(endpoint_url=args.endpoint_url, region=args.region, anonymous=args.anonymous))
    dataset = versions.resolve(args.dataset)  # ROOT@latest -> the version LATEST names
    summary = inspect.summarize(dataset, stat_samples=args.samples, checksums=not args.no_verify)
    if not summary.get("in_progress"):
        if not summary.get("broken_files") and not summary.get("missing_files"):  # no samples read otherwise
            summary["preview"] = inspect.preview(dataset, args.preview or storage.join(dataset, "preview.png"))
        if args.html:  # the report shows a damaged dataset too: what is missing or broken
            from factory.recipes.report import write_report

            summary["report"] = write_report(dataset, summary, args.html)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(inspect.format_summary(summary))
        if args.html and summary.get("in_progress"):
            print(f"report    not written: {dataset} is not finished (no manifest.json yet)")
        if "preview" in summary:
            print(f"preview   {summary['preview']}")
        if "report" in summary:
            print(f"report    {summary['report']}")
    return 0 if summary["complete"] else 1


def _weights(args: argparse.Namespace) -> int:
    from factory import storage
    from factory.backbones import stylegan2_formats as formats
    from factory.config import StorageConfig

    storage.configure(StorageConfig(endpoint_url=args.endpoint_url, region=args.region, anonymous=args.anonymous))
    if args.action == "convert":
        command = shlex.join(["factory", "weights", "convert", args.source, args.out, "--network", args.network])
        record = formats.convert(args.source, args.out, args.network, command)
        arch = record["architecture"]
        print(f"wrote {args.out} ({record['network']} of {record['source']['file']}, {record['source']['format']}; "
              f"{arch['resolution']} px, c_dim {arch['c_dim']}, conv_clamp {arch['conv_clamp']}) and "
              f"{formats.record_path(args.out)}; weights hash {record['weights_hash'][:16]}")
        return 0
    info = formats.inspect(args.file, args.network)
    print(json.dumps(info, indent=2) if args.json else formats.format_inspection(info))
    return 0


def _metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items()))


if __name__ == "__main__":
    sys.exit(main())
