"""Ray job: generate (or resume) a labeled dataset.

    ray job submit --working-dir . -- python jobs/generate.py configs/demo.yaml ray.address=auto
"""

import argparse
import logging
import shlex
import sys

from factory import config as config_lib
from factory.cli import error_exit
from factory.recipes.generate import generate
from factory.runtime import ray_session

log = logging.getLogger("jobs.generate")


def main(cfg: config_lib.FactoryConfig, command: str | None = None) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    with ray_session(cfg.ray):
        manifest = generate(cfg, command=command)
    log.info("%d samples in %d shards at %s", manifest["num_samples"], manifest["num_shards"], cfg.generate.output)
    return manifest


def parse_args(argv: list[str]) -> config_lib.FactoryConfig:
    p = argparse.ArgumentParser(prog="generate", description="generate (or resume) a labeled dataset on Ray Data")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    args = p.parse_args(argv)
    return config_lib.load_config(args.config, args.overrides)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(parse_args(sys.argv[1:]), shlex.join(["python", "jobs/generate.py", *sys.argv[1:]]))
    except Exception as e:  # bad input: one line, exit 2; a failed run: one line, exit 1; a bug: its traceback
        code = error_exit("generate", e)
        if code is None:
            raise
        sys.exit(code)
