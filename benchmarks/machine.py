"""What the benchmarks share: what else the machine did during a measurement, the code revision,
where the results go, and the loopback S3 server. They run as scripts (`python benchmarks/X.py` puts
this folder on sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""What the loopback server accepts; set before Ray starts, so its workers inherit them."""


def busy_cpu_seconds() -> float | None:
    """Machine-wide non-idle CPU time so far (Linux /proc/stat), to tell whether others competed."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def git_revision() -> str | None:
    """HEAD of the checkout the benchmark runs from, "-dirty" when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def write_results(report: dict, out: str) -> None:
    """The benchmark's JSON, its folder created if needed; says where it went (and the run's wall time)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    took = f" ({report['wall_s']:.0f} s in all)" if isinstance(report.get("wall_s"), (int, float)) else ""
    print(f"wrote {out}{took}")


class S3Server:
    """moto's S3 server on a free loopback port, in its own process: the objects it holds count in its
    memory, not in the measured process's (in a driver they would look like driver growth). `stop()`
    ends it; `process` is there for benchmarks that pause or kill it on purpose."""

    def __init__(self, port: int | None = None, timeout: float = 60.0) -> None:
        if port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the moto S3 server did not start on {self.endpoint}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@contextlib.contextmanager
def loopback_s3(bucket: str) -> Iterator[str]:
    """A loopback S3 server with `bucket` created; yields its endpoint URL. Sets the fake credentials
    it accepts (FAKE_AWS) in this process's environment where none are set."""
    import boto3

    for key, value in FAKE_AWS.items():
        os.environ.setdefault(key, value)
    server = S3Server()
    try:
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield server.endpoint
    finally:
        server.stop()
