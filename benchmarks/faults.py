"""Faults survived, as numbers: builds on a local Ray cluster hit by a fault at a seeded random moment,
re-run where needed, and compared with an uninterrupted build of the same config.

    python benchmarks/faults.py                         # 3 trials of every fault
    python benchmarks/faults.py --quick                 # 1 trial per fault, 32 samples
    python benchmarks/faults.py --faults actor-once,s3-down --quick   # CI: tests/test_faults.py
    python benchmarks/faults.py --trials 10 --seed 7

Each trial checks: exactly the reference's data files, byte for byte (so N samples, no duplicate and
no missing key), no temporary debris, manifest.json present and complete, no lease left behind. The
faults (ids for `--faults`):

- `driver`: the driver SIGKILLed once a random number of shards are done, then re-run.
- `actor-once`, `actor-4x`: a build actor SIGKILLed from outside (a signal, found by its process
  title), once or 4 times; Ray restarts it, a build that fails anyway is re-run.
- `corrupt`: a finished shard file truncated or one byte flipped after its completion record;
  `factory inspect` must fail naming it and the re-run must rebuild it.
- `race`: two builds started into one output at once: one builds, the other is refused by the lease
  (or, started late, finds the build done).
- `s3-down`: the build writes to a loopback S3 server (moto, its own process) through a small HTTP
  proxy, the endpoint the build is given. At a random moment the proxy's listener is stopped (open
  connections closed, new ones refused: what a client sees of a stopped server) and started again on
  the same port 3-6 s later. Honest about what it is: the store behind it (the moto process) keeps
  running, because moto loses every object on a restart and a real S3 endpoint's outage does not
  delete the bucket either.
- `s3-flaky`: the same proxy answers a seeded 5% of requests with HTTP 503 SlowDown and delays
  another 5% by 1-3 s, for the whole build; the build must finish through the storage retries (or fail
  cleanly and be re-run once the proxy is healthy).
- `disk-full`: the output on a tmpfs too small for the dataset (a seeded 20-80% of the reference's
  size): writes fail with ENOSPC (real, not simulated); the build must fail with exit 1 and one line
  naming the path, publish no manifest; the tmpfs is then grown (remount) and the re-run completes.
- `read-only`: that tmpfs remounted read-only once a random number of shards are done (EROFS, which
  stops root too, unlike chmod); exit 1, no manifest; remounted read-write, the re-run completes.
- `train-killed`: a `factory train` run (its driver and its Ray Train processes) SIGKILLed at a
  seeded checkpoint, the moment its folder appears in the run's storage (so usually while it is being
  copied); the re-run must resume from the last complete checkpoint (never a half-written one) and
  publish the decoder. Reported: the step it resumed from and the steps lost.
- `train-disk-full`: `train.storage_path` (checkpoints and the published decoder) on a tmpfs holding
  a seeded 0.3-1.2 checkpoints (Ray Train keeps the last 2): exit 1 with one line naming it, no
  decoder published; grown, the re-run resumes from the last complete checkpoint and publishes (where
  the full disk cut Ray Train's run history short, the re-run refuses naming it, the trial deletes it
  as the message says and runs again: recorded as `run_history_cut_short`).
- `node-lost`: a second Ray node (`ray start --address=...` on loopback, 2 CPUs) joins; Ray spreads
  the build's actors over both (the trial records how many were on it); its raylet and workers are
  SIGKILLed at a random moment; the build recovers on the head or is re-run.

`disk-full`, `read-only` and `train-disk-full` need `mount -t tmpfs` (root in a container that allows it); where mount is
refused they are reported as skipped. Also printed: the bad-input table's count
(benchmarks/bad_input.py). Results go to benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _key, _value in (("RAY_AUTH_MODE", "disabled"), ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0"),
                     ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1"), ("RAY_TRAIN_V2_ENABLED", "1")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, ROOT)

from factory import storage  # noqa: E402
from factory.config import StorageConfig  # noqa: E402

BUCKET = "faults"


def config_text(work: Path, num_samples: int) -> str:
    return (f"workdir: {work}\n"
            "decoder: {num_heads: 2}\n"
            f"generate: {{num_samples: {num_samples}, shard_size: 8, batch_size: 8, num_actors: 2, cpus_per_actor: 0.5,\n"
            "           formats: [parquet, webdataset], drop_uncertain: 0.0, lease_seconds: 20}\n")


# ---------------------------------------------------------------- loopback S3 and its fault proxy

def s3_server():
    """The loopback S3 server (benchmarks/machine.py: moto in its own process) with the benchmark's
    bucket."""
    import boto3
    from machine import S3Server

    server = S3Server()
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return server


_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "expect"}
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """An HTTP proxy on loopback in front of the S3 server (aiohttp, which s3fs already depends on),
    on its own event loop thread. It forwards every request unchanged, except: a seeded share
    `error_rate` answered 503 SlowDown (the connection then closed), a share `slow_rate` held
    `delay_s` first; `down()` stops its listener and closes open connections, `up()` listens again on
    the same port."""

    def __init__(self, upstream: str, seed: int) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector

        self.upstream = upstream.rstrip("/")
        self.rng = random.Random(seed)
        self.error_rate = self.slow_rate = self.delay_s = 0.0
        self.counts = {"requests": 0, "errors": 0, "slow": 0}
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="fault-proxy").start()

        async def session():
            return ClientSession(connector=TCPConnector(limit=64), auto_decompress=False,
                                 timeout=ClientTimeout(total=None))

        self.session = self._call(session())
        self.runner = None
        self.up()

    def faults(self, error_rate: float = 0.0, slow_rate: float = 0.0, delay_s: float = 0.0) -> None:
        self.error_rate, self.slow_rate, self.delay_s = error_rate, slow_rate, delay_s

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _handle(self, request):
        import yarl
        from aiohttp import web

        self.counts["requests"] += 1
        draw = self.rng.random()
        if draw < self.error_rate:
            self.counts["errors"] += 1
            response = web.Response(status=503, body=_SLOW_DOWN, content_type="application/xml")
            response.force_close()
            return response
        if draw < self.error_rate + self.slow_rate:
            self.counts["slow"] += 1
            await asyncio.sleep(self.delay_s)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = yarl.URL(self.upstream + request.raw_path, encoded=True)
        async with self.session.request(request.method, url, headers=headers, data=body, allow_redirects=False) as r:
            payload = await r.read()
            out = [(k, v) for k, v in r.headers.items() if k.lower() not in _HOP | {"server", "date"}]
            length = r.headers.get("Content-Length")
        response = web.Response(status=r.status, body=None if request.method == "HEAD" else payload, headers=out)
        if request.method == "HEAD" and length is not None:
            response.headers["Content-Length"] = length  # the object's size, which HEAD answers with
        return response

    def up(self) -> None:
        from aiohttp import web

        async def start():
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
            return runner

        self.runner = self._call(start())

    def down(self) -> None:
        self._call(self.runner.cleanup())

    def close(self) -> None:
        self.down()
        self._call(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the bench and its checks

@dataclass
class Bench:
    """What every trial shares: the work folder, the build config, the Ray cluster, the reference."""

    work: Path
    config: Path
    address: str
    shards: int
    reference: str
    seed: int
    s3: object | None = None  # machine.S3Server, started on first use
    proxy: FaultProxy | None = None
    mounts: list[str] = field(default_factory=list)
    trainer: dict | None = None

    def s3_output(self, name: str) -> str:
        """An output on loopback S3 (started on first use), written through the fault proxy."""
        if self.s3 is None:
            self.s3 = s3_server()
            self.proxy = FaultProxy(self.s3.endpoint, self.seed)
            storage.configure(StorageConfig(endpoint_url=self.s3.endpoint, region="us-east-1"))  # checks: direct
        return f"s3://{BUCKET}/{name}"

    def close(self) -> None:
        for mount in self.mounts:
            subprocess.run(["umount", mount], capture_output=True)
        if self.proxy is not None:
            self.proxy.close()
        if self.s3 is not None:
            self.s3.stop()


def files_under(output: str) -> list[str]:
    """Every file under the output (temporary names included), relative to it."""
    fs, root = storage.filesystem(output)
    if not fs.exists(root):
        return []
    return sorted(os.path.relpath(f, root) for f in fs.find(root))


def data_files(output: str) -> dict[str, str]:
    return {rel: hashlib.sha256(storage.read_bytes(storage.join(output, rel))).hexdigest()
            for rel in files_under(output) if rel.split("/")[0] in ("parquet", "webdataset")}


def keys(output: str) -> list[str]:
    import pyarrow.parquet as pq

    found = []
    for rel in files_under(output):
        if rel.startswith("parquet/") and rel.endswith(".parquet") and not os.path.basename(rel).startswith(".tmp-"):
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, rel))), columns=["key"])
            found += table.column("key").to_pylist()
    return found


def done_shards(output: str) -> int:
    """How many completion records the build has written so far."""
    try:
        return sum(n.startswith("shard-") for n in storage.listdir(storage.join(output, "_stats")))
    except (FileNotFoundError, storage.StorageError):
        return 0


def manifest_complete(output: str) -> bool:
    url = storage.join(output, "manifest.json")
    return storage.exists(url) and bool(storage.read_json(url)["complete"])


def check(output: str, reference: str) -> dict:
    """The trial's result against the reference build."""
    want, got = data_files(reference), data_files(output)
    found, expected = keys(output), keys(reference)
    debris = [rel for rel in files_under(output) if os.path.basename(rel).startswith(".tmp-")
              or os.path.basename(rel) == "_lease.json"]
    return {
        "identical": got == want,
        "samples": len(found),
        "expected": len(expected),
        "duplicates": len(found) - len(set(found)),
        "missing": len(set(expected) - set(found)),
        "debris": debris,
        "manifest_complete": manifest_complete(output),
    }


def cli(bench: Bench, output: str, *overrides: str) -> subprocess.Popen:
    """`factory generate` into `output` on the bench's cluster, its stderr to a file (a pipe nobody
    reads while the build runs could fill and stall it)."""
    if output.startswith("s3://"):
        overrides = (f"storage.endpoint_url={bench.proxy.endpoint}", "storage.region=us-east-1", *overrides)
    return launch(bench, [sys.executable, "-m", "factory.cli", "--log-level", "WARNING", "generate", str(bench.config),
                          f"generate.output={output}", f"ray.address={bench.address}", *overrides])


def launch(bench: Bench, args: list[str]) -> subprocess.Popen:
    logs = bench.work / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{len(list(logs.iterdir())):04d}.err"
    with open(log, "w") as err:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=ROOT)
    process.log = log
    return process


def outcome(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """(exit code, stderr) of a launched process, once it has exited."""
    code = process.wait(timeout=timeout)
    return code, process.log.read_text()


def rerun(bench: Bench, output: str) -> tuple[int, str]:
    return outcome(cli(bench, output))


def wait_for_shards(driver: subprocess.Popen, output: str, at: int, timeout: float = 300) -> None:
    """Until `at` shards are done (or, for 0, the build has started) or the driver has exited."""
    deadline = time.monotonic() + timeout
    while driver.poll() is None and time.monotonic() < deadline:
        if done_shards(output) >= at and (at > 0 or storage.exists(storage.join(output, "build.json"))):
            return
        time.sleep(0.05)


def finish(bench: Bench, driver: subprocess.Popen, output: str, start: float, **result) -> dict:
    """Wait for the faulted build; re-run it if it failed. The trial's record."""
    code, err = outcome(driver)
    rerun_code = None
    result.update(output=output, build_exit=code, **(driver_error(err) if code else {}))
    if code != 0:
        rerun_code, err = rerun(bench, output)
    return {**result, "rerun_exit": rerun_code, "rerun_error": last_line(err) if rerun_code else "",
            "recovery_s": round(time.perf_counter() - start, 2)}


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][-300:] if lines else ""


# ---------------------------------------------------------------- the faults

def fault_driver_killed(rng: random.Random, bench: Bench, name: str) -> dict:
    """SIGKILL the driver once a random number of shards are done (0 .. all but one), then re-run."""
    output = str(bench.work / name)
    at = rng.randrange(0, bench.shards)
    driver = cli(bench, output)
    wait_for_shards(driver, output, at)
    killed_after = done_shards(output)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    start = time.perf_counter()
    code, err = rerun(bench, output)
    return {"output": output, "killed_after_shards": killed_after, "rerun_exit": code,
            "rerun_error": last_line(err) if code else "", "recovery_s": round(time.perf_counter() - start, 2)}


def fault_corrupted_shard(rng: random.Random, bench: Bench, name: str) -> dict:
    """A copy of the finished reference; one random data file truncated or one byte flipped; inspect
    must fail naming it; the re-run rebuilds it."""
    output = str(bench.work / name)
    shutil.copytree(bench.reference, output)
    files = sorted(data_files(output))
    victim = files[rng.randrange(len(files))]
    path = Path(output, victim)
    data = bytearray(path.read_bytes())
    how = rng.choice(["truncate", "flip"])
    if how == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        data[rng.randrange(len(data))] ^= 0xFF
    path.write_bytes(bytes(data))
    inspect = subprocess.run([sys.executable, "-m", "factory.cli", "inspect", output, "--json"], capture_output=True,
                             text=True, cwd=ROOT, timeout=300)
    caught = inspect.returncode == 1 and victim in inspect.stdout
    start = time.perf_counter()
    code, err = rerun(bench, output)
    return {"output": output, "file": victim, "how": how, "inspect_caught": caught, "rerun_exit": code,
            "rerun_error": last_line(err) if code else "", "recovery_s": round(time.perf_counter() - start, 2)}


def fault_two_builds(rng: random.Random, bench: Bench, name: str) -> dict:
    """Two drivers started into one output at once: one builds; the other is refused by the lease (or,
    started late, finds the build done)."""
    output = str(bench.work / name)
    first = cli(bench, output)
    time.sleep(rng.uniform(0, 2))
    second = cli(bench, output)
    start = time.perf_counter()
    results = [outcome(p) for p in (first, second)]
    codes = [code for code, _ in results]
    refused = sum(code == 1 and "being built by another build" in err for code, err in results)
    ok = sorted(codes) in ([0, 0], [0, 1]) and (codes.count(1) == refused)
    if codes.count(0) == 1:  # the refused one: the dataset is the winner's; a re-run is a no-op
        codes.append(rerun(bench, output)[0])
    return {"output": output, "exit_codes": codes, "refused": refused, "promise_kept": ok,
            "recovery_s": round(time.perf_counter() - start, 2)}


def processes(address: str, *titles: str) -> list:
    """The processes of the Ray cluster at `address` (the children of its raylets, on every node it
    has) whose command line starts with one of `titles` and, for a Ray actor, names the given class:
    found the way an operator, or the OOM killer, would, by process title; never another cluster's."""
    import psutil

    raylets = [p for p in psutil.process_iter(["cmdline"])
               if (p.info["cmdline"] or [""])[0].endswith("raylet") and f"--gcs-address={address}" in p.info["cmdline"]]
    found = []
    for raylet in raylets:
        for proc in raylet.children(recursive=True):
            try:
                cmdline = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if any(cmdline.startswith(prefix) and all(part in cmdline for part in rest)
                   for prefix, *rest in (t.split("|") for t in titles)):
                found.append(proc)
    return found


def build_actors(address: str) -> list:
    return processes(address, "ray::MapWorker|ShardBuilder")


def _kill_actors(rng: random.Random, bench: Bench, name: str, kills: int) -> dict:
    """SIGKILL a random build actor `kills` times at random moments (from outside: a signal, not an
    exception in it); Ray restarts it and resubmits its shard. Re-run if the build failed anyway."""
    output = str(bench.work / name)
    moments = sorted(rng.randrange(0, bench.shards) for _ in range(kills))
    driver = cli(bench, output)
    killed, start = [], None
    for at in moments:
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline:
            if done_shards(output) >= at and build_actors(bench.address):
                break
            time.sleep(0.05)
        actors = build_actors(bench.address)
        if driver.poll() is not None or not actors:
            break
        victim = actors[rng.randrange(len(actors))]
        victim.send_signal(signal.SIGKILL)
        killed.append({"pid": victim.pid, "after_shards": done_shards(output)})
        start = start or time.perf_counter()
        time.sleep(rng.uniform(0.5, 2.0))  # let Ray notice before the next kill
    return finish(bench, driver, output, start or time.perf_counter(), killed=killed)


def fault_actor_killed_once(rng: random.Random, bench: Bench, name: str) -> dict:
    return _kill_actors(rng, bench, name, kills=1)


def fault_actor_killed_repeatedly(rng: random.Random, bench: Bench, name: str) -> dict:
    return _kill_actors(rng, bench, name, kills=4)


def fault_s3_down(rng: random.Random, bench: Bench, name: str) -> dict:
    """The S3 endpoint stopped once a random number of shards are done, back on its port 3-6 s later."""
    output = bench.s3_output(name)
    at, down_s = rng.randrange(0, bench.shards), rng.uniform(3, 6)
    driver = cli(bench, output)
    wait_for_shards(driver, output, at)
    downed_after = done_shards(output)
    start = time.perf_counter()
    bench.proxy.down()
    time.sleep(down_s)
    bench.proxy.up()
    return finish(bench, driver, output, start, down_after_shards=downed_after,
                  down_s=round(down_s, 2))


def fault_s3_flaky(rng: random.Random, bench: Bench, name: str) -> dict:
    """5% of S3 requests answered 503 SlowDown, 5% delayed 1-3 s, for the whole build."""
    output = bench.s3_output(name)
    before = dict(bench.proxy.counts)
    bench.proxy.rng.seed(rng.random())
    delay_s = rng.uniform(1, 3)
    bench.proxy.faults(error_rate=0.05, slow_rate=0.05, delay_s=delay_s)
    start = time.perf_counter()
    driver = cli(bench, output)
    try:
        driver.wait(timeout=900)
    finally:
        bench.proxy.faults()  # a re-run, if needed, finds the endpoint healthy
    injected = {k: bench.proxy.counts[k] - before[k] for k in before}
    return finish(bench, driver, output, start, delay_s=round(delay_s, 2), **injected)


def tmpfs(bench: Bench, name: str, size: int) -> Path | None:
    """A fresh tmpfs of `size` bytes at work/name, or None where mount is not permitted."""
    where = bench.work / name
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return None
    bench.mounts.append(str(where))
    return where


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)


RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\t[A-Z]+ \S+\.py:\d+ -- ")
"""How Ray's own loggers (Ray Data's executor, for one) format a line in the driver's stderr."""


def driver_error(err: str) -> dict:
    """The CLI's own error lines in a stderr, told apart from the lines Ray forwards from its workers
    (`(MapWorker(...) pid=N) ...`, where an actor's logged traceback of a failed shard shows) and from
    Ray's own loggers in the driver (Ray Data logs a failed task with its traceback, outside the CLI's
    --log-level): a traceback counts against the rule only when it is not one of Ray's log records."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", raw) for raw in err.splitlines()]
    own, ray_logged, source = [], 0, None
    for line in lines:
        if not line.strip() or re.match(r"^\(.*?pid=\w+\)", line):
            continue
        if RAY_LOG_LINE.match(line):
            source = "ray"
        elif (not line.startswith((" ", "Traceback", "During handling"))
              and not re.match(r"^\w+(\.\w+)*(Error|Exception|Iteration)\b", line)):
            source = None
        if "Traceback" in line:
            ray_logged += source == "ray"
            if source != "ray":
                own.append(line)
        elif source != "ray":
            own.append(line)
    errors = [line for line in own if line.startswith("factory: error:")]
    at = next((i for i, line in enumerate(own) if "Traceback" in line), None)
    return {"error": errors[-1][:400] if errors else "", "error_lines": len(errors), "traceback": at is not None,
            "ray_logged_tracebacks": ray_logged,
            **({"traceback_excerpt": own[max(at - 2, 0): at + 12]} if at is not None else {})}


def failed_cleanly(bench: Bench, driver: subprocess.Popen, output: str) -> dict:
    """The faulted build's exit, its one error line (does it name the output?), and what it left."""
    code, err = outcome(driver)
    said = driver_error(err)
    return {"build_exit": code, **said, "names_path": output in said["error"],
            "manifest_after_fault": storage.exists(storage.join(output, "manifest.json")),
            "complete_after_fault": manifest_complete(output)}


def fault_disk_full(rng: random.Random, bench: Bench, name: str) -> dict:
    """The output on a tmpfs holding a seeded 20-80% of the dataset; grown after the failure, re-run."""
    size = sum(p.stat().st_size for p in Path(bench.reference).rglob("*") if p.is_file())
    limit = int(size * rng.uniform(0.2, 0.8))
    where = tmpfs(bench, name, limit)
    if where is None:
        return {"skipped": "mount -t tmpfs is not permitted here"}
    output = str(where / "out")
    driver = cli(bench, output)
    result = {"output": output, "disk_bytes": limit, "dataset_bytes": size, **failed_cleanly(bench, driver, output)}
    remount(where, f"size={size * 4}")
    start = time.perf_counter()
    code, err = rerun(bench, output)
    return {**result, "rerun_exit": code, "rerun_error": last_line(err) if code else "",
            "recovery_s": round(time.perf_counter() - start, 2)}


def fault_read_only(rng: random.Random, bench: Bench, name: str) -> dict:
    """The output's tmpfs remounted read-only once a random number of shards are done, then
    read-write again, and re-run."""
    size = sum(p.stat().st_size for p in Path(bench.reference).rglob("*") if p.is_file())
    where = tmpfs(bench, name, size * 4)
    if where is None:
        return {"skipped": "mount -t tmpfs is not permitted here"}
    output = str(where / "out")
    at = rng.randrange(0, bench.shards)
    driver = cli(bench, output)
    wait_for_shards(driver, output, at)
    after = done_shards(output)
    remount(where, "ro")
    result = {"output": output, "read_only_after_shards": after, **failed_cleanly(bench, driver, output)}
    remount(where, "rw")
    start = time.perf_counter()
    code, err = rerun(bench, output)
    return {**result, "rerun_exit": code, "rerun_error": last_line(err) if code else "",
            "recovery_s": round(time.perf_counter() - start, 2)}


TRAIN_STEPS, TRAIN_EVERY = 40, 5


def trainer(bench: Bench) -> dict:
    """A labeled set for `factory train` (exported, labeled by the stand-in annotator, imported),
    made once per benchmark run."""
    if bench.trainer is None:
        from factory.toy.annotator import annotate_by_rule

        work = bench.work / "train-fault"
        work.mkdir()
        config = work / "factory.yaml"
        config.write_text(f"workdir: {work}\n"
                          "annotate: {num_images: 8}\n"
                          "decoder: {num_heads: 2}\n"
                          f"train: {{num_workers: 1, steps: {TRAIN_STEPS}, checkpoint_every: {TRAIN_EVERY}, "
                          "val_images: 2}\n")
        for verb in ("export", "import"):
            if verb == "import":
                annotate_by_rule(str(work / "annotations"))
            subprocess.run([sys.executable, "-m", "factory.cli", "--log-level", "WARNING", "annotate", verb, str(config)],
                           check=True, capture_output=True, cwd=ROOT, timeout=600)
        from factory import config as config_lib
        from factory.backbones import backbone_identity
        from factory.decoders import build_decoder

        cfg = config_lib.load_config(str(config))
        model = build_decoder(cfg.decoder, backbone_identity(cfg.backbone).feature_channels, len(cfg.label_names()))
        weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        # a checkpoint holds the weights twice (decoder folder, train state) plus Adam's two moments
        bench.trainer = {"work": work, "config": config, "checkpoint_bytes": 4 * weights + (64 << 10)}
    return bench.trainer


def fault_train_killed(rng: random.Random, bench: Bench, name: str) -> dict:
    """`factory train` SIGKILLed (driver and Ray Train processes) when a seeded checkpoint's folder
    appears; re-run; it must resume from the last complete checkpoint and publish the decoder."""
    from factory.recipes.ray_train import CHECKPOINT_RECORD

    t = trainer(bench)
    run_dir = t["work"] / "train" / name
    decoder = run_dir / "decoder"
    args = [sys.executable, "-m", "factory.cli", "--log-level", "WARNING", "train", str(t["config"]),
            f"train.run_name={name}", f"ray.address={bench.address}"]
    at = rng.randrange(2, TRAIN_STEPS // TRAIN_EVERY)  # the checkpoint to be killed in (a complete one before it)
    driver = launch(bench, args)
    ever: list[str] = []  # every checkpoint folder seen, in order (Ray Train keeps only the last 2)

    def look() -> list[Path]:
        present = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()) if run_dir.is_dir() else []
        ever.extend(p.name for p in present if p.name not in ever)
        return present

    deadline = time.monotonic() + 600
    while driver.poll() is None and time.monotonic() < deadline and len(ever) < at:
        look()
        time.sleep(0.01)
    finished_first = driver.poll() is not None
    victims = [driver] + processes(bench.address, "ray::RayTrainWorker", "ray::TrainController")
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - gone already
            pass
    driver.wait()
    present = look()
    complete = [p.name for p in present if (p / CHECKPOINT_RECORD).exists()]
    mid_write = bool(present) and present[-1].name not in complete
    start = time.perf_counter()
    code, err = outcome(launch(bench, args))
    metrics = {}
    if (decoder / "metrics.json").exists():
        metrics = json.loads((decoder / "metrics.json").read_text())["metrics"]
    resumed = int(metrics.get("start_step", -1))
    reached = len(ever) * TRAIN_EVERY  # the step of the checkpoint being written when killed
    published = code == 0 and (decoder / "model.safetensors").exists() and metrics.get("step") == TRAIN_STEPS
    return {"ray_train_processes_killed": len(victims) - 1, "killed_in_checkpoint": len(ever),
            "finished_before_the_kill": finished_first, "mid_write": mid_write,
            "complete_checkpoints_on_disk_at_kill": len(complete), "resumed_from_step": resumed,
            "steps_lost": reached - resumed if resumed >= 0 else None,
            "rerun_exit": code, "rerun_error": last_line(err) if code else "",
            "decoder_published": published, "recovery_s": round(time.perf_counter() - start, 2),
            # a training fault has no dataset: recovered = resumed from a checkpoint at or before the
            # kill (the last one Ray Train registered, never a half-written one) and published
            "recovered": published and 0 <= resumed <= reached and resumed % TRAIN_EVERY == 0
                         and not finished_first,
            "missing": 0, "duplicates": 0}


def fault_train_disk_full(rng: random.Random, bench: Bench, name: str) -> dict:
    """`factory train` with `train.storage_path` (its checkpoints and the published decoder) on a tmpfs
    that holds a seeded 0.3-1.2 checkpoints (estimated from the decoder's size): a checkpoint write
    fails with ENOSPC; the run must fail with exit 1 and one line, publish no decoder; grown, the re-run
    resumes and publishes."""
    from factory.recipes.ray_train import RUN_HISTORY

    t = trainer(bench)
    one = t["checkpoint_bytes"]
    limit = int(one * rng.uniform(0.3, 1.2))  # Ray Train keeps 2 checkpoints: less than that must fail
    where = tmpfs(bench, name, limit)
    if where is None:
        return {"skipped": "mount -t tmpfs is not permitted here"}
    decoder = where / "run" / "decoder"
    args = [sys.executable, "-m", "factory.cli", "--log-level", "WARNING", "train", str(t["config"]),
            f"train.storage_path={where}", "train.run_name=run", f"ray.address={bench.address}"]
    code, err = outcome(launch(bench, args))
    said = driver_error(err)
    result = {"disk_bytes": limit, "checkpoint_bytes": one, "build_exit": code, **said,
              "names_path": str(where) in said["error"],
              "decoder_after_fault": (decoder / "model.safetensors").exists()}
    remount(where, f"size={one * (TRAIN_STEPS // TRAIN_EVERY + 4) * 2}")
    start = time.perf_counter()
    code, err = outcome(launch(bench, args))
    history = where / "run" / RUN_HISTORY
    if code == 1 and f"{history} is cut short" in err:  # what the message says to do, an operator's step
        result["run_history_cut_short"] = True
        history.unlink()
        code, err = outcome(launch(bench, args))
    found = decoder / "metrics.json"
    metrics = json.loads(found.read_text())["metrics"] if found.exists() else {}
    published = code == 0 and (decoder / "model.safetensors").exists() and metrics.get("step") == TRAIN_STEPS
    return {**result, "rerun_exit": code, "rerun_error": last_line(err) if code else "",
            "resumed_from_step": int(metrics.get("start_step", -1)), "decoder_published": published,
            "recovery_s": round(time.perf_counter() - start, 2),
            "recovered": published and 0 <= int(metrics.get("start_step", -1)) % TRAIN_EVERY == 0,
            "missing": 0, "duplicates": 0}


def fault_node_lost(rng: random.Random, bench: Bench, name: str) -> dict:
    """A second Ray node joins on loopback; Ray's scheduler spreads the build's actors over both (the
    trial records how many were on the node); the node's raylet and its workers are SIGKILLed at a
    random moment; the build recovers on the head or is re-run."""
    import psutil

    output = str(bench.work / name)
    temp = tempfile.mkdtemp(prefix="node-", dir="/tmp")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    node = subprocess.run([ray_cli, "start", f"--address={bench.address}", "--num-cpus=2",
                           "--resources={\"faultnode\": 1}", f"--temp-dir={temp}", "--disable-usage-stats"],
                          capture_output=True, text=True, timeout=180)
    if node.returncode != 0:
        return {"skipped": f"ray start failed: {last_line(node.stderr or node.stdout)}"}
    raylets = [p for p in psutil.process_iter(["cmdline"]) if "raylet" in " ".join(p.info["cmdline"] or [])[:200]
               and temp in " ".join(p.info["cmdline"] or [])]
    at = rng.randrange(0, bench.shards)
    driver = cli(bench, output)
    wait_for_shards(driver, output, at)
    after = done_shards(output)
    on_node = [p for p in build_actors(bench.address) if any(r.pid in {a.pid for a in p.parents()} for r in raylets)]
    start = time.perf_counter()
    victims = [c for r in raylets for c in r.children(recursive=True)] + raylets
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    result = finish(bench, driver, output, start, killed_after_shards=after,
                    actors_on_lost_node=len(on_node), processes_killed=len(victims))
    shutil.rmtree(temp, ignore_errors=True)
    return result


@dataclass(frozen=True)
class Fault:
    label: str
    run: object
    quick: bool = True
    """Part of --quick when no --faults are named."""


FAULTS = {
    "driver": Fault("driver SIGKILLed at a random moment", fault_driver_killed),
    "actor-once": Fault("actor SIGKILLed from outside, once", fault_actor_killed_once),
    "actor-4x": Fault("actor SIGKILLed from outside, 4 times", fault_actor_killed_repeatedly),
    "corrupt": Fault("shard corrupted after its record", fault_corrupted_shard),
    "race": Fault("two builds into one output", fault_two_builds),
    "s3-down": Fault("S3 endpoint down 3-6 s mid-build", fault_s3_down),
    "s3-flaky": Fault("S3 answering 503 / slowly (5% + 5%)", fault_s3_flaky),
    "disk-full": Fault("output disk full (tmpfs), grown, re-run", fault_disk_full),
    "read-only": Fault("output disk turned read-only mid-build", fault_read_only),
    "train-killed": Fault("decoder training killed mid-checkpoint", fault_train_killed),
    "train-disk-full": Fault("training checkpoint disk full, grown, re-run", fault_train_disk_full),
    "node-lost": Fault("a Ray worker node lost mid-build", fault_node_lost, quick=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 trial per fault, 32 samples (CI)")
    parser.add_argument("--faults", default=None,
                        help=f"comma-separated fault ids (default: all; --quick leaves out "
                             f"{', '.join(k for k, f in FAULTS.items() if not f.quick)}): {', '.join(FAULTS)}")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bad-input", action="store_true", help="do not run the bad-input table")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "faults.json"))
    args = parser.parse_args()
    if args.faults is None:
        selected = [k for k, f in FAULTS.items() if f.quick or not args.quick]
    else:
        selected = [k.strip() for k in args.faults.split(",") if k.strip()]
        unknown = [k for k in selected if k not in FAULTS]
        if unknown or not selected:
            parser.error(f"--faults {args.faults}: unknown {', '.join(unknown) or 'empty'}; "
                         f"choose from {', '.join(FAULTS)}")
    trials, samples = (1, 32) if args.quick else (args.trials, args.samples)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ray

    from factory import config as config_lib
    from factory.config import RayConfig
    from factory.recipes.generate import generate
    from factory.runtime import init_ray
    from machine import busy_cpu_seconds, git_revision

    rng = random.Random(args.seed)
    rows, report = [], {"trials": trials, "samples": samples, "seed": args.seed, "faults": {},
                        "revision": git_revision(), "cpus": os.cpu_count()}
    wall0, busy0 = time.perf_counter(), busy_cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="faults-") as d:
        work = Path(d)
        config = work / "factory.yaml"
        config.write_text(config_text(work, samples))
        cfg = config_lib.load_config(str(config))
        _save_untrained_decoder(cfg)
        init_ray(RayConfig(num_cpus=2))
        reference = str(work / "reference")
        cfg.generate.output = reference
        t0 = time.perf_counter()
        generate(cfg)
        report["uninterrupted_s"] = round(time.perf_counter() - t0, 2)
        bench = Bench(work, config, ray.get_runtime_context().gcs_address, -(-samples // 8), reference, args.seed)
        try:
            for fault in selected:
                results = []
                for t in range(trials):
                    result = FAULTS[fault].run(rng, bench, f"{fault}-{t}")
                    if "skipped" not in result and "output" in result:
                        result.update(check(result["output"], reference))
                        result["recovered"] = (result["identical"] and result["manifest_complete"] and not result["debris"]
                                               and result.get("inspect_caught", True) and result.get("promise_kept", True))
                    if result.get("build_exit"):  # the faulted run failed: did it fail by the rule?
                        result["failed_by_the_rule"] = (result["build_exit"] == 1 and result["error_lines"] == 1
                                                        and not result["traceback"] and result.get("names_path", True)
                                                        and not result.get("complete_after_fault", False)
                                                        and not result.get("decoder_after_fault", False))
                    results.append(result)
                report["faults"][fault] = results
                ran = [r for r in results if "skipped" not in r]
                failed = [r for r in ran if "failed_by_the_rule" in r]
                rows.append((FAULTS[fault].label, len(ran), sum(bool(r["recovered"]) for r in ran),
                             sum(r["missing"] for r in ran), sum(r["duplicates"] for r in ran),
                             f"{sum(r['failed_by_the_rule'] for r in failed)}/{len(failed)}",
                             max((r["recovery_s"] for r in ran), default=0.0)))
                print(f"{fault}: {rows[-1][2]} of {len(ran)} recovered, {rows[-1][5]} failed runs by the rule"
                      + (f" ({results[0]['skipped']})" if not ran else ""), flush=True)
        finally:
            bench.close()
            ray.shutdown()
        if not args.skip_bad_input:
            import bad_input

            with bad_input.loopback_s3() as (endpoint, bucket):
                outcomes = bad_input.run_all(work / "bad-input", endpoint, bucket)
            report["bad_input"] = {"tried": len(outcomes), "met_rule": sum(o.ok for o in outcomes),
                                   "failed": [{"case": o.name, "problems": o.problems} for o in outcomes if not o.ok]}
    busy1 = busy_cpu_seconds()
    report["wall_s"] = round(time.perf_counter() - wall0, 1)
    if busy0 is not None and busy1 is not None:
        report["machine_busy_cpu_s"] = round(busy1 - busy0, 1)  # this run and anything else on the machine
    print(f"{'fault':46s} {'trials':>6s} {'recovered':>9s} {'data lost':>9s} {'duplicates':>10s} "
          f"{'failed by the rule':>18s} {'recovery s (max)':>16s}")
    for label, n, ok, lost, dups, rule, secs in rows:
        print(f"{label:46s} {n:6d} {ok:9d} {lost:9d} {dups:10d} {rule:>18s} {secs:16.1f}")
    print(f"uninterrupted build of {samples} samples: {report['uninterrupted_s']:.1f} s")
    if "bad_input" in report:
        print(f"bad input: {report['bad_input']['met_rule']} of {report['bad_input']['tried']} refused by the rule")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s in all)")
    everything = all(r[2] == r[1] and r[3] == 0 and r[4] == 0 and r[5].split("/")[0] == r[5].split("/")[1]
                     for r in rows)
    bad_ok = "bad_input" not in report or report["bad_input"]["met_rule"] == report["bad_input"]["tried"]
    return 0 if everything and bad_ok else 1


def _save_untrained_decoder(cfg) -> None:
    """A seeded, untrained decoder where `generate.decoder` points: faults are about bytes, not labels."""
    from factory import config as config_lib
    from factory.backbones import load_backbone
    from factory.decoders import build_decoder
    from factory.decoders.files import save_decoder

    backbone = load_backbone(cfg.backbone)
    model = build_decoder(cfg.decoder, backbone.feature_channels, len(cfg.label_names())).eval()
    save_decoder(cfg.generate.decoder, model, cfg.decoder, cfg.label_names(), backbone.feature_channels,
                 backbone.weights_hash, config_lib.to_yaml(cfg))


if __name__ == "__main__":
    sys.exit(main())
