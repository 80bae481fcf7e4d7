"""Ray job: fit the decoder.

    ray job submit --working-dir . -- python jobs/train_decoder.py configs/demo.yaml ray.address=auto
"""

import logging
import sys

from factory import config as config_lib
from factory.recipes.train import train
from factory.runtime import ray_session

log = logging.getLogger("jobs.train_decoder")


def main(cfg: config_lib.FactoryConfig) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    with ray_session(cfg.ray, training=True):
        metrics = train(cfg)
    log.info("decoder at %s: %s", cfg.generate.decoder, metrics)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(config_lib.load_config(sys.argv[1], sys.argv[2:]))
