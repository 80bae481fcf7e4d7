"""Dataset generation: the bare model loop vs the full Ray Data build writing to S3 (or a folder).

Three measurements in one run, on the same models (the config's backbone and an untrained, seeded
decoder saved the way `factory train` publishes one; throughput does not depend on training) and the
same seeds (`generate.start_seed` on):

1. bare loop: `backbone(seeds)` then `decoder(features, (res, res))` under `torch.inference_mode`
   (as the build runs them) in batches of `generate.batch_size` (a diffusion backbone,
   `backbone.kind=diffusion decoder.kind=perception`, gets each seed's prompt as the build gives
   it), in a fresh subprocess with torch on 1 thread (what one actor with `cpus_per_actor=1` gets:
   Ray sets OMP_NUM_THREADS to the actor's CPUs, checked by a probe actor).
   No Ray, no encoding, no writing. Then `label_seeds` (the same forward passes plus PNG encoding and
   row building) on the first `--encode-samples` seeds, to split model time from encode time.
2. full build: `factory.recipes.generate.generate(cfg)` (the calibration pass staging the first
   shards, Ray Data actor pools, encoding on threads beside the model, shard writers, upload) into a
   loopback S3 server (moto's server, in its own process; `--storage local`: a local folder, the
   embedded default's storage, without the server's CPU on the same cores) on a local Ray cluster
   started by `factory.runtime.init_ray` with 4 logical CPUs, once with each actor count
   (`cpus_per_actor=1`), each into a fresh prefix. Wall time is the whole `generate()` call, the
   calibration pass included (it makes the first shards' samples, which the build then finishes
   instead of computing again). samples/s counts generated seeds (kept + dropped), as the bare loop
   does. Beside it, per actor, "in shards": samples per second of the time the actor spent making
   shards (without the pool's start-up, the driver's preparation and the final publish).
   Rounds: this machine's speed drifts by 15-20% between consecutive runs of the same loop, so a
   round is (the bare loop alone in a fresh process; with more than one actor count, the machine's
   ceiling for the most actors N: N bare loops in N processes at once; then one build per actor
   count), one after the other; `--repeats` rounds run, each round's ratios pair a build with the
   bare loop and the ceiling run just before it, and the result is the median of each ratio over
   the rounds.
   Goals (issue 17), on the medians: full build with 1 actor >= 0.90 of the bare loop, 2 actors
   >= 1.8 of 1.
3. memory: the bare subprocess's peak RSS (ru_maxrss); during each build, a background thread samples
   (every `--sample-interval` s) the RSS and CPU time of this driver process (which also hosts the S3
   server and its in-memory objects) and of every descendant process, grouped by process title: the
   pools' actors (`ray::MapWorker(...)`, calibration scorers and shard builders) and the rest of Ray
   (raylet, GCS, dashboard and agents, Ray Data's helper actors, idle workers). RSS sums count pages
   shared between processes (torch's libraries, Ray's object store) once per process, so they
   overstate the total.

    python benchmarks/generate.py [--samples 4000] [--shard-size 500] [--batch-size 16]
        [--formats parquet,webdataset] [--storage s3|local] [--repeats 3] [--out benchmarks/results/generate.json]
        [--quick] [key=value ...]

Trailing `key=value` arguments override the config for every measurement (e.g. decoder.num_heads=3).
`--quick` runs tiny numbers to check that the script works (under a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict

from machine import FAKE_AWS, busy_cpu_seconds, git_revision, loopback_s3, write_results  # noqa: E402  (benchmarks/machine.py)

CPUS_PER_ACTOR = 1
VARIANTS = ("channels_last", "compile")  # the backbone's opt-in speed-ups (`Backbone.accelerate`)
RAY_NUM_CPUS = 4
BUCKET = "bench"
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4000, help="seeds per build (generate.num_samples)")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=None, help="seeds per forward pass (default: the config's)")
    p.add_argument("--calibration-samples", type=int, default=None, help="default: the config's")
    p.add_argument("--formats", default="parquet", help="comma-separated: parquet, webdataset")
    p.add_argument("--encode-samples", type=int, default=1000, help="seeds for the label_seeds (encode) pass")
    p.add_argument("--sample-interval", type=float, default=0.25, help="seconds between memory samples")
    p.add_argument("--storage", choices=("s3", "local"), default="s3",
                   help="where the builds write: loopback S3 (moto's server, its own process, on the same cores) "
                        "or a local folder (the embedded default's storage)")
    p.add_argument("--out", default="benchmarks/results/generate.json")
    p.add_argument("--quick", action="store_true", help="tiny numbers: check that the script runs")
    p.add_argument("--actors", default="1,2", help="actor counts to build with, compared with the first")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of (bare loop, one build per actor count), one after the other: each round's "
                        "ratios are paired, and the medians over rounds are the result")
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="on a GPU machine: 1 gives each actor a GPU (e.g. --actors 1,8 on 8 GPUs)")
    p.add_argument("--memory-samples", type=int, default=0,
                   help="after the timed builds, one build of this many seeds (2 actors) whose driver and actor "
                        "memory is reported per quarter of the run: flat means it does not grow with samples")
    p.add_argument("--variants", default="",
                   help="comma-separated opt-in speed-ups to time in the bare process against the eager loop on "
                        "the same --encode-samples seeds: channels_last, compile (generate.channels_last / "
                        "generate.compile; compile's first batch, which compiles, is reported apart)")
    p.add_argument("overrides", nargs="*", help="config key=value overrides for every measurement")
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # internal: the bare loop
    p.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)  # internal: the bare loop alone
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # internal: where the decoder was saved
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.shard_size, args.encode_samples = 48, 16, 16
        args.batch_size = args.batch_size or 8
        args.calibration_samples = args.calibration_samples or 16
        args.repeats = 1
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def actor_counts(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.actors.split(",")]


def config_overrides(args: argparse.Namespace, workdir: str) -> list[str]:
    """The overrides every measurement shares (builds add their actors, output and storage)."""
    out = [f"workdir={workdir}", f"generate.num_samples={args.samples}", f"generate.shard_size={args.shard_size}",
           f"generate.formats=[{args.formats}]", f"generate.cpus_per_actor={CPUS_PER_ACTOR}",
           f"generate.gpus_per_actor={args.gpus_per_actor}"]
    if args.batch_size is not None:
        out.append(f"generate.batch_size={args.batch_size}")
    if args.calibration_samples is not None:
        out.append(f"generate.calibration_samples={args.calibration_samples}")
    return out + list(args.overrides)


def load(args: argparse.Namespace, workdir: str, extra: tuple[str, ...] = ()):
    from factory.config import load_config

    return load_config(None, [*config_overrides(args, workdir), *extra])


def save_models(cfg) -> None:
    """The backbone and a seeded, untrained decoder saved where `generate.decoder` points."""
    from factory import config as config_lib
    from factory.backbones import load_backbone
    from factory.decoders import build_decoder
    from factory.decoders.files import save_decoder

    backbone = load_backbone(cfg.backbone)
    model = build_decoder(cfg.decoder, backbone.feature_channels, len(cfg.label_names())).eval()
    save_decoder(cfg.generate.decoder, model, cfg.decoder, cfg.label_names(), backbone.feature_channels,
                 backbone.weights_hash, config_lib.to_yaml(cfg))


# ---------------------------------------------------------------- the bare loop (a fresh process)

def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_bare(args: argparse.Namespace) -> None:
    """Internal: the bare loop and the encode pass in this process; JSON on stdout's last line."""
    import torch

    device = "cuda" if args.gpus_per_actor > 0 else "cpu"
    if device == "cpu":
        torch.set_num_threads(CPUS_PER_ACTOR)
    from factory.backbones import load_backbone
    from factory.data import prompts
    from factory.decoders.files import load_decoder
    from factory.recipes.labeling import label_seeds, prompts_for

    cfg = load(args, args.workdir)
    g = cfg.generate
    t0 = time.perf_counter()
    backbone, decoder = load_backbone(cfg.backbone, device), load_decoder(g.decoder, device)
    load_s = time.perf_counter() - t0
    texts = None  # a diffusion build's prompts, each seed given its prompt as the build gives it
    if cfg.backbone.kind == "diffusion":
        texts = [p.text for p in prompts.resolve(cfg.prompts, cfg.labels.classes, args.workdir)[0]]
    size = (backbone.resolution, backbone.resolution)

    def forward(batch: list[int], model=backbone):  # under inference_mode, as the build's forward passes run
        with torch.inference_mode():
            out = model(batch, prompts_for(batch, texts, g.start_seed))
            decoder(out.features, size)
            return out.images

    def in_batches(items: list[int]) -> list[list[int]]:  # consecutive blocks of the build's batch size
        return [items[i : i + g.batch_size] for i in range(0, len(items), g.batch_size)]

    seeds = list(range(g.start_seed, g.start_seed + g.num_samples))
    batches = in_batches(seeds)
    forward(batches[0])  # warm-up: first-call allocations and kernel choices
    rss_loaded = current_rss()

    started = time.time()  # wall clock: the parallel loops' common window is read from these
    t0 = time.perf_counter()
    for batch in batches:
        forward(batch)
    bare_s = time.perf_counter() - t0
    if args.loop_only:
        print(json.dumps({"samples": len(seeds), "seconds": bare_s, "samples_per_s": len(seeds) / bare_s,
                          "started": started, "ended": started + bare_s}))
        return

    # The per-seed mode (backbone.batch_invariant=true) on the same seeds: what batching buys.
    per_seed_seeds = seeds[: args.encode_samples]
    backbone.batch_invariant = True
    t0 = time.perf_counter()
    for batch in in_batches(per_seed_seeds):
        forward(batch)
    per_seed_s = time.perf_counter() - t0
    backbone.batch_invariant = False

    encode_seeds = seeds[: args.encode_samples]
    t0 = time.perf_counter()
    for batch in in_batches(encode_seeds):
        label_seeds(backbone, decoder, batch, 0, cfg, "bench", texts)
    encode_s = time.perf_counter() - t0

    # Opt-in speed-ups, each on a fresh backbone, against the eager loop timed just before it.
    variants = {}
    variant_batches = in_batches(encode_seeds)  # the encode pass's seeds and batches
    for flag in args.variants:
        accelerated = load_backbone(cfg.backbone, device)
        accelerated.accelerate(**{flag: True})
        t0 = time.perf_counter()
        images = forward(batches[0], accelerated)  # compiles, for compile
        first_s = time.perf_counter() - t0
        diff = int((images.int() - forward(batches[0]).int()).abs().max())
        timed = {}
        for name, model in (("eager", backbone), (flag, accelerated)):
            t0 = time.perf_counter()
            for batch in variant_batches:
                forward(batch, model)
            timed[name] = sum(len(b) for b in variant_batches) / (time.perf_counter() - t0)
        variants[flag] = {"first_batch_s": round(first_s, 3), "samples_per_s": timed[flag],
                          "eager_samples_per_s": timed["eager"], "over_eager": timed[flag] / timed["eager"],
                          "max_abs_image_diff_vs_eager": diff}
        del accelerated
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "resolution": backbone.resolution,
        "samples": len(seeds), "seconds": bare_s, "samples_per_s": len(seeds) / bare_s,
        "model_load_s": load_s,
        "per_seed": {"samples": len(per_seed_seeds), "seconds": per_seed_s,
                     "samples_per_s": len(per_seed_seeds) / per_seed_s,
                     "batched_over_per_seed": (len(seeds) / bare_s) / (len(per_seed_seeds) / per_seed_s)},
        "label_seeds": {"samples": len(encode_seeds), "seconds": encode_s,
                        "samples_per_s": len(encode_seeds) / encode_s},
        "variants": variants,
        "rss_after_load_bytes": rss_loaded, "peak_rss_bytes": peak_rss(),
    }))


def bare_command(args: argparse.Namespace, workdir: str, loop_only: bool = False) -> list[str]:
    """The command of a bare-loop subprocess; `loop_only`: the loop alone, no per-seed or encode passes."""
    cmd = [sys.executable, os.path.abspath(__file__), "--bare", *(["--loop-only"] if loop_only else []), "--workdir", workdir,
           "--samples", str(args.samples), "--shard-size", str(args.shard_size), "--formats", args.formats,
           "--encode-samples", str(args.encode_samples), "--gpus-per-actor", str(args.gpus_per_actor)]
    if args.variants and not loop_only:
        cmd += ["--variants", ",".join(args.variants)]
    for flag, value in (("--batch-size", args.batch_size), ("--calibration-samples", args.calibration_samples)):
        if value is not None:
            cmd += [flag, str(value)]
    return [*cmd, *args.overrides]


def bare_in_subprocess(args: argparse.Namespace, workdir: str) -> dict:
    busy, own = busy_cpu_seconds(), children_cpu_seconds()
    done = subprocess.run(bare_command(args, workdir), check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu_s_used_by_other_processes"] = other_cpu(busy, own, busy_cpu_seconds(), children_cpu_seconds())
    return result


def bare_loop_only(args: argparse.Namespace, workdir: str) -> dict:
    """The bare loop alone (no per-seed or encode passes) in a fresh process: one round's reference."""
    done = subprocess.run(bare_command(args, workdir, loop_only=True), check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bare_in_parallel(args: argparse.Namespace, workdir: str, processes: int, one: dict) -> dict:
    """The machine's own ceiling for N actors: N bare loops (model only, 1 thread each) in N
    processes at once, as N actors run side by side: all their samples over the span from the first
    loop's start to the last one's end, against one bare loop's samples/s. The most an N-actor build
    could reach here with nothing else running: the cores' shared caches, memory bandwidth and clock
    are in it, the factory's own work (Ray, the driver, encoding, storage) is not."""
    cmd = bare_command(args, workdir, loop_only=True)
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = []
    for proc in running:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"bare loop process exited {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    window = max(r["ended"] for r in results) - min(r["started"] for r in results)
    total = sum(r["samples"] for r in results) / window  # all samples over the span of all loops
    return {"processes": processes, "samples_per_s_each": [round(r["samples_per_s"], 2) for r in results],
            "window_s": window, "samples_per_s_total": total, "over_one": total / one["samples_per_s"]}


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def other_cpu(busy0, own0, busy1, own1) -> float | None:
    return None if busy0 is None else round(max(0.0, (busy1 - busy0) - (own1 - own0)), 2)


# ---------------------------------------------------------------- the builds (Ray, loopback S3)

class ProcessSampler(threading.Thread):
    """Samples RSS and CPU time of this process and all its descendants (the local Ray cluster).

    Groups: "driver" (this process: the benchmark and Ray Data's driver side), "s3_server" (the
    loopback S3 server's process, which holds every object written),
    "pool_actors" (processes titled `ray::MapWorker(...)`: the calibration and build pools' actors),
    "ray_other" (the rest: Ray's daemons, dashboard, helper actors and idle workers)."""

    GROUPS = ("driver", "s3_server", "pool_actors", "ray_other")

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.interval = psutil, interval
        self.root = psutil.Process()
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (group, cpu seconds at last sample)
        self.window_start()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def sample(self) -> dict[str, int]:
        totals = dict.fromkeys(self.GROUPS, 0)
        actor_rss: dict[int, int] = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    title = " ".join(proc.cmdline()) or proc.name()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            if proc.pid == self.root.pid:
                group = "driver"
            elif "moto.server" in title:
                group = "s3_server"
            else:
                group = "pool_actors" if title.startswith("ray::MapWorker(") else "ray_other"
            totals[group] += rss
            if group == "pool_actors":
                actor_rss[proc.pid] = rss
            with self.lock:
                self.cpu[proc.pid] = (group, times.user + times.system)
                label = title.split()[0][:60] if group != "driver" else "driver"
                old = self.peak_by_pid.get(proc.pid, (0, label))
                self.peak_by_pid[proc.pid] = (max(old[0], rss), label if rss >= old[0] else old[1])
        totals["total"] = sum(totals.values())
        with self.lock:
            self.timeline.append((time.perf_counter(), totals["driver"], max(actor_rss.values(), default=0)))
            self.samples += 1
            for key, value in totals.items():
                self.peaks[key] = max(self.peaks.get(key, 0), value)
        return totals

    def window_start(self) -> None:
        with self.lock:
            self.start_cpu = {pid: cpu for pid, (_, cpu) in getattr(self, "cpu", {}).items()}
            self.peaks: dict[str, int] = {}
            self.peak_by_pid: dict[int, tuple[int, str]] = {}
            self.timeline: list[tuple[float, int, int]] = []  # (time, driver RSS, largest actor RSS)
            self.samples = 0

    def window_end(self) -> dict:
        """Peaks since `window_start`, CPU seconds per group, and the biggest processes."""
        self.sample()
        with self.lock:
            cpu = dict.fromkeys(self.GROUPS, 0.0)
            for pid, (group, seconds) in self.cpu.items():
                cpu[group] += seconds - self.start_cpu.get(pid, 0.0)
            biggest = sorted(self.peak_by_pid.values(), reverse=True)[:8]
            quarters = []
            if self.timeline:
                t0, t1 = self.timeline[0][0], self.timeline[-1][0]
                for q in range(4):
                    part = [x for x in self.timeline
                            if t0 + q * (t1 - t0) / 4 <= x[0] <= t0 + (q + 1) * (t1 - t0) / 4] or self.timeline[-1:]
                    quarters.append({"driver_peak_rss_bytes": max(x[1] for x in part),
                                     "largest_actor_peak_rss_bytes": max(x[2] for x in part)})
            return {
                "by_quarter_of_the_run": quarters,
                "samples": self.samples,
                "peak_rss_bytes": dict(self.peaks),
                "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                "largest_processes": [{"process": label, "peak_rss_bytes": rss} for rss, label in biggest],
            }


def actor_threads() -> int:
    """torch's thread count inside an actor reserving `CPUS_PER_ACTOR` CPUs, as the pool's get."""
    import ray

    @ray.remote(num_cpus=CPUS_PER_ACTOR)
    class Probe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    probe = Probe.remote()
    threads = ray.get(probe.threads.remote())
    ray.kill(probe)
    return threads


def shard_summary(manifest: dict) -> dict:
    """Where each shard's time went: the model's forward passes (model_s), waiting for encode threads
    (encode_wait_s: encoding not hidden behind the model), writing rows (write_s), publishing files
    (publish_s); staged calibration shards add finish_staged_s."""
    shards = manifest["shards"]
    keys = ("model_s", "encode_wait_s", "write_s", "publish_s", "total_s")
    sums = {key: round(sum(s["timings"].get(key, 0.0) for s in shards), 3) for key in keys}
    sums["finish_staged_s"] = round(sum(s["timings"].get("finish_staged_s", 0.0) for s in shards), 3)
    total = sums["total_s"] + sums["finish_staged_s"]
    return {
        **{f"sum_{k}": v for k, v in sums.items()},
        "model_fraction": round(sums["model_s"] / total, 4) if total else None,
        "median_shard_total_s": statistics.median(s["timings"]["total_s"] for s in shards),
        "per_shard": [{"name": s["name"], "generated": s["generated"], "bytes": s["bytes"], **s["timings"]}
                      for s in shards],
    }


def run_build(args: argparse.Namespace, workdir: str, endpoint: str | None, num_actors: int,
              sampler: ProcessSampler, extra: tuple[str, ...] = (), tag: str = "") -> dict:
    """One build into a fresh output: loopback S3 at `endpoint`, or (None) a folder in `workdir`."""
    from factory.recipes.generate import generate

    name = f"generate-{num_actors}-actors{'-' + tag if tag else ''}"
    if endpoint is None:
        output, storage = os.path.join(workdir, name), ()
    else:
        output, storage = f"s3://{BUCKET}/{name}", (f"storage.endpoint_url={endpoint}", "storage.region=us-east-1")
    cfg = load(args, workdir, (f"generate.num_actors={num_actors}", f"generate.output={output}", *storage, *extra))
    sampler.window_start()
    busy = busy_cpu_seconds()
    t0 = time.perf_counter()
    manifest = generate(cfg)
    wall = time.perf_counter() - t0
    busy_end = busy_cpu_seconds()
    memory = sampler.window_end()
    calibration_s = manifest["calibration"]["seconds"] if manifest["calibration"] else 0.0
    generated = manifest["num_generated"]
    summary = shard_summary(manifest)
    busy_s = summary["sum_total_s"] + summary["sum_finish_staged_s"]
    return {
        "num_actors": num_actors,
        "output": output,
        "samples": generated,
        "kept": manifest["num_samples"],
        "shards": manifest["num_shards"],
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "wall_s": wall,
        "calibration_s": calibration_s,
        "calibration_samples": manifest["calibration"]["num_scored"] if manifest["calibration"] else 0,
        "samples_per_s": generated / wall,
        # the share of the build's wall time the actors spent making shards (staged ones included)
        "actor_busy_fraction": round(busy_s / (num_actors * wall), 4),
        # samples per second of one actor's shard-making time: the per-sample cost without start-up
        "in_shards_samples_per_actor_s": generated / busy_s,
        # wall time no actor spent in a shard, per actor: pool start-up, driver preparation, the card
        "outside_shards_s": round(wall - busy_s / num_actors, 3),
        "shard_timings": summary,
        "memory_and_cpu": memory,
        "machine_busy_cpu_s": None if busy is None else round(busy_end - busy, 2),
        # CPU time of processes outside this benchmark's tree: timings are comparable only when small
        "cpu_s_used_by_other_processes": None if busy is None else round(
            max(0.0, busy_end - busy - sum(memory["cpu_s"].values())), 2),
    }


def round_ratios(loop: dict, builds: list[dict], ceiling: dict | None = None) -> dict[str, float]:
    """One round's paired ratios: each build against the bare loop run just before it (whole build,
    and inside shards: samples per second of actor time spent making shards, i.e. without start-up,
    calibration bookkeeping and publishing), each actor count against the first (whole build, and
    inside shards: all actors' shard-making throughput), and, with the
    round's `ceiling` (N bare loops at once, `bare_in_parallel`), what N loops reached over one and
    the share of that the N-actor build reached."""
    one, out = builds[0], {}
    for b in builds:
        n = b["num_actors"]
        out[f"full_{n}_actors_over_bare"] = b["samples_per_s"] / loop["samples_per_s"]
        out[f"in_shards_{n}_actors_over_bare"] = b["in_shards_samples_per_actor_s"] / loop["samples_per_s"]
    for b in builds[1:]:
        out[f"{b['num_actors']}_actors_over_{one['num_actors']}"] = b["samples_per_s"] / one["samples_per_s"]
        # the same inside shards (all actors' shard-making throughput): what a build long enough
        # for the pool's start-up not to count tends to
        out[f"in_shards_{b['num_actors']}_actors_over_{one['num_actors']}"] = (
            b["num_actors"] * b["in_shards_samples_per_actor_s"]) / (one["num_actors"] * one["in_shards_samples_per_actor_s"])
    top = next((b for b in builds if ceiling and b["num_actors"] == ceiling["processes"] and b is not one), None)
    if top is not None:
        out[f"{ceiling['processes']}_bare_processes_over_1"] = ceiling["over_one"]
        scaling = out[f"{top['num_actors']}_actors_over_{one['num_actors']}"]
        out[f"{top['num_actors']}_actors_over_{one['num_actors']}_of_ceiling"] = scaling / ceiling["over_one"]
    return out


# ---------------------------------------------------------------- report

def print_report(report: dict) -> None:
    bare, builds, s = report["bare_loop"], report["builds"], report["settings"]
    print(f"generate: {s['samples']} seeds, {s['resolution']}px, shards of {s['shard_size']}, batch {s['batch_size']}, "
          f"formats {','.join(s['formats'])}, {s['decoder_heads']} heads, "
          f"calibration {s['calibration_samples']} seeds, into {s['storage']}; "
          f"{report['cpu_count']} CPUs, torch {report['torch']}, ray {report['ray']}")
    print(f"{'run':<30} {'samples':>7} {'wall s':>7} {'calib s':>7} {'samples/s':>9} {'peak RSS MiB':>20}")
    enc = bare["label_seeds"]
    print(f"{'bare loop (1 thread)':<30} {bare['samples']:>7} {bare['seconds']:>7.1f} {'-':>7} "
          f"{bare['samples_per_s']:>9.1f} {bare['peak_rss_bytes'] / MIB:>20.0f}")
    print(f"{'label_seeds: + encode, 1 thread':<30} {enc['samples']:>7} {enc['seconds']:>7.1f} {'-':>7} "
          f"{enc['samples_per_s']:>9.1f} {'(same process)':>20}")
    ps = bare["per_seed"]
    print(f"{'per-seed mode (batch_invariant)':<30} {ps['samples']:>7} {ps['seconds']:>7.1f} {'-':>7} "
          f"{ps['samples_per_s']:>9.1f} {'(same process)':>20}")
    for rnd in report["rounds"]:
        print(f"{'round ' + str(rnd['round']) + ': bare loop':<30} {s['samples']:>7} {rnd['bare_seconds']:>7.1f} {'-':>7} "
              f"{rnd['bare_samples_per_s']:>9.1f} {'-':>20}")
        par = rnd["parallel"]
        if par:
            print(f"{'round ' + str(rnd['round']) + ': ' + str(par['processes']) + ' bare loops at once':<30} "
                  f"{par['processes'] * s['samples']:>7} {par['window_s']:>7.1f} {'-':>7} "
                  f"{par['samples_per_s_total']:>9.1f} {'(one process each)':>20}")
        for b in rnd["builds"]:
            peaks = b["memory_and_cpu"]["peak_rss_bytes"]
            mem = f"{peaks['total'] / MIB:.0f} ({peaks['pool_actors'] / MIB:.0f} actors)"
            print(f"{'round ' + str(rnd['round']) + ': full build, ' + str(b['num_actors']) + ' actor' + 's' * (b['num_actors'] > 1):<30} "
                  f"{b['samples']:>7} {b['wall_s']:>7.1f} {b['calibration_s']:>7.1f} "
                  f"{b['samples_per_s']:>9.1f} {mem:>20}")
        print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in rnd["ratios"].items()))
    r = report["ratios"]
    print(f"median over {len(report['rounds'])} round(s): " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    print("goals (medians): " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["goals_met"].items()))
    for b in builds:
        t, cpu = b["shard_timings"], b["memory_and_cpu"]["cpu_s"]
        print(f"round {b['round']}, {b['num_actors']} actor(s): per-shard sums model {t['sum_model_s']:.1f} s, waiting for encoding "
              f"{t['sum_encode_wait_s']:.1f} s, write {t['sum_write_s']:.1f} s, publish {t['sum_publish_s']:.1f} s, "
              f"finishing staged {t['sum_finish_staged_s']:.1f} s; model {100 * t['model_fraction']:.0f}% of shard "
              f"time; outside shards {b['outside_shards_s']:.1f} s per actor; CPU-s: pool actors "
              f"{cpu['pool_actors']:.1f}, driver {cpu['driver']:.1f}, S3 server {cpu['s3_server']:.1f}, rest of Ray {cpu['ray_other']:.1f}, other "
              f"processes {b['cpu_s_used_by_other_processes']}")
    m = report.get("memory_build")
    if m:
        print(f"memory build ({m['samples']} seeds, 2 actors, {m['samples_per_s']:.0f} samples/s), peak RSS MiB per "
              "quarter of the run: " + "; ".join(
                  f"driver {q['driver_peak_rss_bytes'] / MIB:.0f}, largest actor {q['largest_actor_peak_rss_bytes'] / MIB:.0f}"
                  for q in m["memory_and_cpu"]["by_quarter_of_the_run"]))
    for flag, v in bare["variants"].items():
        print(f"variant {flag} (bare loop, {enc['samples']} seeds): {v['samples_per_s']:.1f} samples/s against "
              f"{v['eager_samples_per_s']:.1f} eager just before ({v['over_eager']:.2f}x); first batch "
              f"{v['first_batch_s']:.1f} s; images differ from eager by at most {v['max_abs_image_diff_vs_eager']}")
    print(f"bare loop: other processes used {bare['cpu_s_used_by_other_processes']} CPU-s while it ran")
    print("peak RSS: bare = the bare subprocess's ru_maxrss; builds = sampled sum over the driver, the S3 "
          "server and all Ray processes, shared pages counted per process; (actors) = the pools' actors")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.bare:
        run_bare(args)
        return
    # Before Ray starts, so its workers inherit them (the loopback server accepts any credentials).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.update(FAKE_AWS)
    import ray
    import torch

    from factory.config import RayConfig
    from factory.runtime import init_ray

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as workdir:
        # 1. Models, then the bare loop in a fresh process (before Ray's daemons exist).
        cfg = load(args, workdir)
        save_models(cfg)
        print(f"bare loop: {args.samples} seeds ...", flush=True)
        bare = bare_in_subprocess(args, workdir)
        most = max(actor_counts(args))

        # 2. Loopback S3 (or a local folder), Ray, then one build per actor count.
        with loopback_s3(BUCKET) if args.storage == "s3" else contextlib.nullcontext() as endpoint:
            init_ray(RayConfig(num_cpus=RAY_NUM_CPUS))
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
            sampler = ProcessSampler(args.sample_interval)
            sampler.start()
            try:
                threads_in_actor = actor_threads()
                sampler.window_start()
                time.sleep(max(1.0, 2 * args.sample_interval))
                idle = sampler.window_end()  # the cluster at rest, before any build
                # A small build first, unmeasured: Ray Data's own helper actors start with a
                # cluster's first dataset, which would otherwise fall on the first measured build only.
                run_build(args, workdir, endpoint, 1, sampler, ("generate.num_samples=16", "generate.shard_size=16",
                                                                "generate.calibration_samples=16"), "warm-up")
                rounds = []
                for r in range(1, args.repeats + 1):
                    print(f"round {r} of {args.repeats}: bare loop ...", flush=True)
                    loop = bare_loop_only(args, workdir)
                    ceiling = None
                    if most > 1:
                        print(f"round {r} of {args.repeats}: {most} bare loops at once ...", flush=True)
                        ceiling = bare_in_parallel(args, workdir, most, loop)
                    builds = []
                    for n in actor_counts(args):
                        print(f"round {r} of {args.repeats}: full build, {n} actor(s) ...", flush=True)
                        builds.append({"round": r, **run_build(args, workdir, endpoint, n, sampler, tag=f"round{r}")})
                    rounds.append({"round": r, "bare_samples_per_s": loop["samples_per_s"], "bare_seconds": loop["seconds"],
                                   "parallel": ceiling, "builds": builds, "ratios": round_ratios(loop, builds, ceiling)})
                memory_build = None
                if args.memory_samples:
                    print(f"memory build: {args.memory_samples} seeds, 2 actors ...", flush=True)
                    memory_build = run_build(args, workdir, endpoint, 2, sampler,
                                             (f"generate.num_samples={args.memory_samples}",), "memory")
            finally:
                sampler.stop()
                ray.shutdown()

    ratios = {key: statistics.median(r["ratios"][key] for r in rounds) for key in rounds[0]["ratios"]}
    targets = {"full_1_actors_over_bare": 0.90, "2_actors_over_1": 1.8}  # issue 17's, where measured
    goals = {f"{key} >= {target}": ratios[key] >= target for key, target in targets.items() if key in ratios}
    g = cfg.generate
    report = {
        "benchmark": "generate",
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cpu_count": os.cpu_count(),
        "git": git_revision(),
        "settings": {
            "samples": g.num_samples, "shard_size": g.shard_size, "batch_size": g.batch_size,
            "formats": list(g.formats), "calibration_samples": g.calibration_samples,
            "drop_uncertain": g.drop_uncertain, "start_seed": g.start_seed, "cpus_per_actor": g.cpus_per_actor,
            "actor_counts": actor_counts(args), "repeats": args.repeats, "gpus_per_actor": args.gpus_per_actor, "ray_num_cpus": RAY_NUM_CPUS, "actor_torch_threads": threads_in_actor,
            "bare_torch_threads": bare["threads"], "encode_samples": args.encode_samples, "quick": args.quick,
            "overrides": list(args.overrides), "resolution": bare["resolution"],
            "decoder_heads": cfg.decoder.num_heads, "storage": ("moto server on 127.0.0.1 (its own process)" if args.storage == "s3"
                                                              else "a local folder"),
            "ray_data_progress_bars": False, "memory_sample_interval_s": args.sample_interval,
            "backbone": asdict(cfg.backbone), "decoder": asdict(cfg.decoder), "labels": asdict(cfg.labels),
        },
        "bare_loop": bare,
        "ray_idle": idle,
        "rounds": rounds,
        "builds": [b for r in rounds for b in r["builds"]],
        "memory_build": memory_build,
        "ratios": ratios,
        "goals_met": goals,
        "wall_s": time.perf_counter() - started,
    }
    print_report(report)
    write_results(report, args.out)


if __name__ == "__main__":
    main()
