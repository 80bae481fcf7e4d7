"""Ray job: fit the decoder.

    ray job submit --working-dir . -- python jobs/train_decoder.py configs/demo.yaml ray.address=auto
"""

import argparse
import logging
import sys

from factory import config as config_lib
from factory.cli import error_exit
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


def parse_args(argv: list[str]) -> config_lib.FactoryConfig:
    p = argparse.ArgumentParser(prog="train_decoder", description="fit the decoder on the labeled set on Ray Train")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    args = p.parse_args(argv)
    return config_lib.load_config(args.config, args.overrides)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(parse_args(sys.argv[1:]))
    except Exception as e:  # bad input: one line, exit 2; a failed run: one line, exit 1; a bug: its traceback
        code = error_exit("train_decoder", e)
        if code is None:
            raise
        sys.exit(code)
