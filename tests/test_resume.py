"""Exactly-once builds at scale: a 10,000-sample build to loopback S3 whose driver is killed mid-run
resumes to the very bytes of an uninterrupted build, with every key exactly once."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import save_untrained_decoder

from factory import config as config_lib
from factory import storage
from factory.dataset import layout
from factory.recipes.generate import generate

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NUM_SAMPLES = int(os.environ.get("FACTORY_RESUME_SAMPLES", "10000"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster, s3_endpoint):
    """A config file for a 10k-sample build (both formats, filtering on) and its decoder."""
    import boto3

    work = tmp_path_factory.mktemp("resume")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="resume")
    path = work / "factory.yaml"
    path.write_text(
        f"workdir: {work}\n"
        f"storage: {{endpoint_url: '{s3_endpoint}', region: us-east-1}}\n"
        "decoder: {num_heads: 3}\n"
        f"generate: {{num_samples: {NUM_SAMPLES}, shard_size: 250, batch_size: 50, num_actors: 2,\n"
        "           cpus_per_actor: 1, calibration_samples: 500, formats: [parquet, webdataset]}\n"
    )
    cfg = config_lib.load_config(str(path))
    save_untrained_decoder(cfg)  # resume is about bytes, not label quality
    storage.configure(cfg.storage)
    yield path, cfg
    storage.configure(config_lib.StorageConfig())


def data_files(output: str) -> dict[str, str]:
    """Every published shard file under `output` (both formats) -> sha256 of its bytes."""
    import hashlib

    out = {}
    for folder in layout.FORMATS:
        for name in sorted(storage.listdir(storage.join(output, folder))):
            out[f"{folder}/{name}"] = hashlib.sha256(storage.read_bytes(storage.join(output, folder, name))).hexdigest()
    return out


def keys(output: str, folder: str, suffix: str) -> list[str]:
    fs, path = storage.arrow_filesystem(storage.join(output, folder))
    files = sorted(f"{path}/{n}" for n in storage.listdir(storage.join(output, folder)) if n.endswith(suffix))
    return pq.read_table(files, filesystem=fs, columns=["key"]).column("key").to_pylist()


def test_killed_build_resumes_to_the_uninterrupted_bytes(setup, ray_cluster):
    path, cfg = setup
    reference = "s3://resume/uninterrupted"
    resumed = "s3://resume/killed"

    # 1. The reference: one uninterrupted build.
    cfg.generate.output = reference
    manifest = generate(cfg)
    assert manifest["complete"] and manifest["num_generated"] == NUM_SAMPLES

    # 2. The same build in a separate driver process, killed (SIGKILL) once a few shards are done.
    address = ray_cluster.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-m", "factory.cli", "generate", str(path), f"generate.output={resumed}",
         f"ray.address={address}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    stats = storage.join(resumed, layout.STATS_DIR)
    deadline = time.monotonic() + 300
    while not (storage.exists(stats) and len(storage.listdir(stats)) >= 6):
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert time.monotonic() < deadline, "no shards completed within 5 minutes"
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_at_kill = len(storage.listdir(stats))
    assert not storage.exists(storage.join(resumed, layout.MANIFEST))  # killed before the end
    assert done_at_kill < NUM_SAMPLES // 250

    # 3. Re-run to completion: only the missing shards are built.
    cfg.generate.output = resumed
    manifest = generate(cfg)
    assert manifest["complete"] and manifest["num_generated"] == NUM_SAMPLES

    # 4. Exactly the reference's bytes and keys: no duplicates, no holes, no debris.
    assert data_files(resumed) == data_files(reference)
    for folder, suffix in (("parquet", ".parquet"), ("webdataset", ".meta.parquet")):
        found = keys(resumed, folder, suffix)
        assert len(found) == len(set(found)) == manifest["num_samples"]
    assert 0.85 * NUM_SAMPLES < manifest["num_samples"] < 0.95 * NUM_SAMPLES  # ~10% dropped as uncertain
    assert generate(cfg) == manifest  # a finished build: a re-run is a no-op
