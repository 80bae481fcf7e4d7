"""Ray job: train a backbone on a folder of images.

    ray job submit --working-dir . -- python jobs/pretrain.py configs/toy_gan.yaml workdir=/shared/factory-work
    (workdir, outputs and checkpoints: an absolute path every node mounts, or s3://; see README)
"""

import logging
import sys

from factory import config as config_lib
from factory.cli import run_job
from factory.data.image_folder import load_image_folder
from factory.recipes.pretrain import pretrain, resolution_of
from factory.runtime import ray_session

log = logging.getLogger("jobs.pretrain")


def main(cfg: config_lib.FactoryConfig) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    # every bad image named before a cluster starts or is joined; the recipe takes what was read
    data = load_image_folder(cfg.pretrain.images, resolution_of(cfg)) if cfg.pretrain.images else None
    with ray_session(cfg.ray, training=True):
        record = pretrain(cfg, data=data)  # records this process's command line
    log.info("%s backbone at %s: %s", cfg.backbone.kind, cfg.pretrain.output, record["final_losses"])
    return record


if __name__ == "__main__":
    run_job("pretrain", "train the backbone on a folder of images on Ray Train", main, sys.argv[1:])
