"""Ray job: fit the decoder.

    ray job submit --working-dir . -- python jobs/train_decoder.py configs/demo.yaml workdir=/shared/factory-work
    (workdir, outputs and checkpoints: an absolute path every node mounts, or s3://; see README)
"""

import logging
import sys

from factory import config as config_lib
from factory.cli import run_job
from factory.recipes.train import check_inputs, train
from factory.runtime import ray_session

log = logging.getLogger("jobs.train_decoder")


def main(cfg: config_lib.FactoryConfig) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    checked = check_inputs(cfg)  # bad input fails in a second, before a cluster starts or is joined
    with ray_session(cfg.ray, training=True):
        metrics = train(cfg, checked)
    log.info("decoder at %s: %s", cfg.generate.decoder, metrics)
    return metrics


if __name__ == "__main__":
    run_job("train_decoder", "fit the decoder on the labeled set on Ray Train", main, sys.argv[1:])
