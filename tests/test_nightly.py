"""The nightly build as a real Ray job: `ray start --head` on loopback, `ray job submit` of
jobs/nightly.py writing to loopback S3; idempotent per night, and LATEST moves only on success."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from factory import storage
from factory.cli import main
from factory.config import StorageConfig, load_config
from factory.dataset import layout, validate, versions

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate Ray head started with the real CLI; killed (not `ray stop`ped) at the end so the
    test session's own cluster survives."""
    port, dashboard = free_port(), free_port()
    # Every fixed default port moved, so this head can run beside the session's own cluster.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", *ports,
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
         f"--temp-dir={tmp_path_factory.mktemp('ray')}", "--include-dashboard=true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        ready = [RAY, "job", "submit", "--address", address, "--", sys.executable, "-c", "pass"]
        while subprocess.run(ready, capture_output=True).returncode != 0:  # the job agent can lag the server
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head's job server did not come up in 3 minutes"
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=5)  # its graceful stop takes ~30 s; nothing of this head outlives the test
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # and whatever of the group outlived it
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def nightly_config(tmp_path_factory, s3_endpoint):
    """A labeled set on local disk; training runs, versions and LATEST on loopback S3."""
    import boto3

    from factory.recipes.annotate import export_images, import_labels
    from factory.toy.annotator import annotate_by_rule

    work = tmp_path_factory.mktemp("nightly")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="nightly")
    path = work / "nightly.yaml"
    path.write_text(
        f"workdir: {work}\n"
        f"storage: {{endpoint_url: '{s3_endpoint}', region: us-east-1}}\n"
        "annotate: {num_images: 8}\n"
        "decoder: {num_heads: 3}\n"
        "train: {num_workers: 1, steps: 20, checkpoint_every: 10, val_images: 2, storage_path: 's3://nightly/runs'}\n"
        "generate: {num_samples: 60, shard_size: 30, batch_size: 16, num_actors: 1, calibration_samples: 60}\n"
        "nightly: {root: 's3://nightly/datasets', keep: 2}\n"
    )
    cfg = load_config(str(path))
    export_images(cfg)
    annotate_by_rule(cfg.annotate.dir)
    import_labels(cfg)
    storage.configure(cfg.storage)
    yield path
    storage.configure(StorageConfig())


def submit(address: str, config, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit` as a user would type it, from the repository root, waiting for the end."""
    return subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", REPO, "--",
         sys.executable, "jobs/nightly.py", str(config), *args],
        capture_output=True, text=True, timeout=540,
    )


def test_nightly_job_publishes_validates_and_is_idempotent(ray_head, nightly_config):
    root = "s3://nightly/datasets"
    first = submit(ray_head, nightly_config, "--date", "2026-11-23")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "succeeded" in first.stdout
    assert versions.read_latest(root)["version"] == "2026-11-23"
    version = versions.resolve(f"{root}@latest")
    assert version == f"{root}/2026-11-23"
    assert validate.validate(version)["samples"] == layout.read_manifest(version)["num_samples"] > 0
    card = storage.read_bytes(storage.join(version, "README.md")).decode()  # the version carries its card
    assert card.startswith("---\n") and "python jobs/nightly.py" in card
    endpoint = load_config(str(nightly_config)).storage.endpoint_url
    assert main(["inspect", f"{root}@latest", "--json", "--endpoint-url", endpoint, "--region", "us-east-1"]) == 0

    # The same night again: the decoder is reused and the version is already finished.
    stats = storage.join(version, "_stats", "shard-00000.json")
    before = storage.filesystem(stats)[0].info(storage.filesystem(stats)[1])["LastModified"]
    again = submit(ray_head, nightly_config, "--date", "2026-11-23")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "is up to date" in again.stdout and "training" not in again.stdout.split("is up to date")[1]
    assert storage.filesystem(stats)[0].info(storage.filesystem(stats)[1])["LastModified"] == before

    # The same night with a changed config: refused in one line that says how to rebuild it.
    changed = submit(ray_head, nightly_config, "--date", "2026-11-23", "generate.batch_size=5")
    assert changed.returncode != 0 and "Traceback" not in changed.stdout + changed.stderr
    assert "this night's version was built from a different config; pass generate.overwrite=true" in (
        changed.stdout + changed.stderr)

    # A night whose build fails validation: non-zero exit, LATEST still names the last good version.
    bad = submit(ray_head, nightly_config, "--date", "2026-11-24", "nightly.min_samples=100000")
    assert bad.returncode != 0
    assert "failed validation" in bad.stdout + bad.stderr
    assert versions.read_latest(root)["version"] == "2026-11-23"
    assert versions.list_versions(root) == ["2026-11-23", "2026-11-24"]  # kept for a look, never LATEST
