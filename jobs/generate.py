"""Ray job: generate (or resume) a labeled dataset.

    ray job submit --working-dir . -- python jobs/generate.py configs/demo.yaml workdir=/shared/factory-work
    (workdir, outputs and checkpoints: an absolute path every node mounts, or s3://; see README)
"""

import logging
import shlex
import sys

from factory import config as config_lib
from factory.cli import run_job
from factory.recipes.generate import generate
from factory.runtime import ray_session

log = logging.getLogger("jobs.generate")


def main(cfg: config_lib.FactoryConfig, command: str | None = None) -> dict:
    log.info("resolved config:\n%s", config_lib.to_yaml(cfg))
    with ray_session(cfg.ray):
        manifest = generate(cfg, command=command)
    log.info("%d samples in %d shards at %s", manifest["num_samples"], manifest["num_shards"], cfg.generate.output)
    return manifest


if __name__ == "__main__":
    command = shlex.join(["python", "jobs/generate.py", *sys.argv[1:]])
    run_job("generate", "generate (or resume) a labeled dataset on Ray Data", lambda cfg: main(cfg, command),
            sys.argv[1:])
