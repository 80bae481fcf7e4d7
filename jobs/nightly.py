"""Ray job: one night's dataset build, safe to schedule and to re-run.

    ray job submit --working-dir . -- python jobs/nightly.py configs/demo.yaml workdir=/shared/factory-work [--date 2026-11-24]
    (workdir, outputs and checkpoints: an absolute path every node mounts, or s3://; see README)

1. train: the decoder's run is named from its inputs (labeled set, backbone, decoder and train
   settings), so changed inputs train a new decoder and unchanged ones reuse the published one;
2. generate: the version <nightly.root>/<date> (a re-run the same night resumes or does nothing);
3. validate: counts, completeness, checksums, label sanity; a failure exits non-zero and leaves
   LATEST where it was;
4. publish: move <nightly.root>/LATEST to this version in one write;
5. retention: keep the newest `nightly.keep` versions, never the one LATEST names.
"""

import argparse
import datetime
import logging
import shlex
import sys

from factory import config as config_lib
from factory import storage
from factory.dataset import validate, versions
from factory.decoders.files import MODEL_FILE
from factory.lease import LeaseError
from factory.recipes.generate import GenerateError, generate
from factory.recipes.ray_train import TrainError
from factory.recipes.train import inputs_hash, labeled_file, train
from factory.runtime import check_outputs_outlive_the_job, ray_session

log = logging.getLogger("jobs.nightly")


def decoder_run(cfg: config_lib.FactoryConfig) -> str:
    """A training run name that changes exactly when the decoder's inputs or length change."""
    return "nightly-" + config_lib.stable_hash([inputs_hash(cfg, labeled_file(cfg)), cfg.train.steps])[:12]


def main(cfg: config_lib.FactoryConfig, date: datetime.date) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    check_outputs_outlive_the_job(cfg)
    storage.configure(cfg.storage)
    with ray_session(cfg.ray, training=True):
        return build(cfg, date)


def build(cfg: config_lib.FactoryConfig, date: datetime.date) -> dict:
    root, version = cfg.nightly.root, versions.version_name(date)

    # 1. The decoder: reuse the one published for these inputs, or train it.
    cfg.train.run_name = decoder_run(cfg)
    cfg.generate.decoder = storage.join(cfg.train.storage_path, cfg.train.run_name, "decoder")
    if storage.exists(storage.join(cfg.generate.decoder, MODEL_FILE)):
        log.info("decoder %s is up to date", cfg.generate.decoder)
    else:
        log.info("inputs changed or first night: training %s", cfg.train.run_name)
        train(cfg)

    # 2. Tonight's version.
    cfg.generate.output = storage.join(root, version)
    try:
        manifest = generate(cfg, command=shlex.join(["python", "jobs/nightly.py", *sys.argv[1:]]))
    except FileExistsError:  # generate's advice names generate.output, which the job sets itself
        raise FileExistsError(f"{cfg.generate.output}: this night's version was built from a different config; pass "
                              "generate.overwrite=true to rebuild it, or --date for another night") from None

    # 3. Validate before anyone can see it.
    checked = validate.validate(cfg.generate.output, cfg.nightly.min_samples, cfg.nightly.verify_checksums,
                                cfg.nightly.label_samples)
    log.info("%s validated: %s", cfg.generate.output, checked)

    # 4. Publish, then 5. retention.
    pointer = versions.set_latest(root, version, manifest)
    removed = versions.prune(root, cfg.nightly.keep)
    log.info("LATEST -> %s; removed old versions %s", pointer["version"], removed or "none")
    return pointer


def parse_args(argv: list[str]) -> tuple[config_lib.FactoryConfig, datetime.date]:
    p = argparse.ArgumentParser(description="one night's dataset build: train if needed, generate, validate, publish")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--date", type=datetime.date.fromisoformat, default=datetime.datetime.now(datetime.UTC).date(),
                   help="the night being built, YYYY-MM-DD (default: today, UTC)")
    args = p.parse_intermixed_args(argv)  # --date may come before, between or after overrides
    return config_lib.load_config(args.config, args.overrides), args.date


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(*parse_args(sys.argv[1:]))
    except (validate.ValidationError, config_lib.ConfigError, storage.StorageError, GenerateError, TrainError,
            LeaseError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"nightly: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (config_lib.ConfigError, FileExistsError, FileNotFoundError, ValueError)) else 1)
