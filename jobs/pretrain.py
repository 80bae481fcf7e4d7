"""Ray job: train a backbone on a folder of images.

    ray job submit --working-dir . -- python jobs/pretrain.py configs/toy_gan.yaml ray.address=auto
"""

import argparse
import logging
import sys

from factory import config as config_lib
from factory.cli import error_exit
from factory.data.image_folder import load_image_folder
from factory.recipes.pretrain import pretrain, resolution_of
from factory.runtime import ray_session

log = logging.getLogger("jobs.pretrain")


def main(cfg: config_lib.FactoryConfig) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    if cfg.pretrain.images is not None:  # every bad image named before a cluster starts or is joined
        load_image_folder(cfg.pretrain.images, resolution_of(cfg))
    with ray_session(cfg.ray, training=True):
        record = pretrain(cfg)  # records this process's command line
    log.info("%s backbone at %s: %s", cfg.backbone.kind, cfg.pretrain.output, record["final_losses"])
    return record


def parse_args(argv: list[str]) -> config_lib.FactoryConfig:
    p = argparse.ArgumentParser(prog="pretrain", description="train the backbone on a folder of images on Ray Train")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    args = p.parse_args(argv)
    return config_lib.load_config(args.config, args.overrides)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(parse_args(sys.argv[1:]))
    except Exception as e:  # bad input: one line, exit 2; a failed run: one line, exit 1; a bug: its traceback
        code = error_exit("pretrain", e)
        if code is None:
            raise
        sys.exit(code)
