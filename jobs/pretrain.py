"""Ray job: train a backbone on a folder of images.

    ray job submit --working-dir . -- python jobs/pretrain.py configs/toy_gan.yaml ray.address=auto
"""

import logging
import sys

from factory import config as config_lib
from factory.recipes.pretrain import pretrain
from factory.runtime import ray_session

log = logging.getLogger("jobs.pretrain")


def main(cfg: config_lib.FactoryConfig) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    with ray_session(cfg.ray, training=True):
        record = pretrain(cfg)  # records this process's command line
    log.info("%s backbone at %s: %s", cfg.backbone.kind, cfg.pretrain.output, record["final_losses"])
    return record


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(config_lib.load_config(sys.argv[1], sys.argv[2:]))
