"""Style Interpreter inference: project-then-upsample vs the naive upsample-concatenate-MLP.

The release's channel layout at 256 px: 512 channels at 4, 8, 16 and 32 px, 256 at 64, 128 at 128
and 64 at 256, every resolution tapped twice (D = 4992); 10 heads; 20 classes. Both variants run
on the same model and inputs; time is the median of `--repeats` runs after a warm-up, memory is
the forward pass's own peak (CUDA: max_memory_allocated above what inputs and model hold; CPU:
each variant in a fresh subprocess, peak RSS minus the RSS before the first full-size forward, taken
after a tiny forward has loaded the libraries' kernels).

    python benchmarks/interpreter.py [--device cpu|cuda] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from machine import busy_cpu_seconds, write_results  # noqa: E402  (benchmarks/machine.py)

from factory.decoders.interpreter import BAND_ELEMENTS, StyleInterpreter, default_hidden

TAPS = [(c, r) for c, r in [(512, 4), (512, 8), (512, 16), (512, 32), (256, 64), (128, 128), (64, 256)] for _ in (0, 1)]
VARIANTS = ("fast", "naive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256, help="output resolution (taps scale with it)")
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--band-elements", type=int, default=BAND_ELEMENTS)
    p.add_argument("--out", default="benchmarks/results/interpreter.json")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one CPU variant
    p.add_argument("--dump", help=argparse.SUPPRESS)  # internal: where that variant saves its output
    return p.parse_args(argv)


def taps(size: int) -> list[tuple[int, int]]:
    return [(c, max(1, r * size // 256)) for c, r in TAPS]


def build(args: argparse.Namespace) -> tuple[StyleInterpreter, list[torch.Tensor]]:
    """The model (eval, non-trivial BN statistics) and random native-resolution features."""
    device = torch.device(args.device)
    spec = taps(args.size)
    model = StyleInterpreter([c for c, _ in spec], args.classes, num_heads=args.heads, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in model.norms:
            norm.running_mean.copy_(0.1 * torch.randn(norm.running_mean.shape, generator=gen))
            norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=gen))
    features = [torch.randn(args.batch, c, r, r, generator=gen) for c, r in spec]
    return model.eval().to(device), [f.to(device) for f in features]


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def own_cpu_seconds() -> float:
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def measure(variant: str, model: StyleInterpreter, features: list[torch.Tensor], args) -> tuple[dict, torch.Tensor]:
    """Time and peak memory of one variant; returns its raw numbers and its output."""
    size = (args.size, args.size)
    if variant == "fast":
        def run() -> torch.Tensor:
            return model.forward_maps(features, size, band_elements=args.band_elements)
    else:
        def run() -> torch.Tensor:
            return model.forward_maps_naive(features, size)
    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        small = [f[:1, :, :2, :2] for f in features]
        model.forward_maps(small, (4, 4)) if variant == "fast" else model.forward_maps_naive(small, (4, 4))
        sync()  # libraries and kernels are loaded now, so the baseline below holds them
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = current_rss()
        out = run()  # warm-up
        sync()
        times = []
        for _ in range(args.repeats):
            out = None
            sync()
            start = time.perf_counter()
            out = run()
            sync()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base
    return {"times_s": times, "median_s": statistics.median(times), "peak_bytes": peak, "baseline_bytes": base}, out


def run_cpu_variant(args: argparse.Namespace) -> None:
    """Internal: one variant in this (fresh) process; numbers as JSON on stdout's last line."""
    model, features = build(args)
    result, out = measure(args.variant, model, features, args)
    torch.save(out.contiguous(), args.dump)
    print(json.dumps(result))


def run_all(args: argparse.Namespace) -> tuple[dict, float]:
    if args.device == "cuda":
        model, features = build(args)
        results, outputs = {}, {}
        for v in VARIANTS:
            results[v], outputs[v] = measure(v, model, features, args)
            outputs[v] = outputs[v].float().cpu()
        return results, float((outputs["fast"] - outputs["naive"]).abs().max())
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:
            dump = os.path.join(tmp, f"{v}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--dump", dump,
                   "--device", args.device, "--batch", str(args.batch), "--size", str(args.size),
                   "--heads", str(args.heads), "--classes", str(args.classes), "--repeats", str(args.repeats),
                   "--band-elements", str(args.band_elements)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[v] = json.loads(done.stdout.strip().splitlines()[-1])
            outputs[v] = torch.load(dump)
    return results, float((outputs["fast"] - outputs["naive"]).abs().max())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        run_cpu_variant(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    busy_before, own_before, wall_before = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    results, max_abs_diff = run_all(args)
    busy_after, own_after, wall = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter() - wall_before
    others = None if busy_before is None else max(0.0, (busy_after - busy_before) - (own_after - own_before))
    fast, naive = results["fast"], results["naive"]
    ratios = {
        "time_naive_over_fast": naive["median_s"] / fast["median_s"],
        "memory_naive_over_fast": naive["peak_bytes"] / max(fast["peak_bytes"], 1),
    }
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    spec = taps(args.size)
    report = {
        "benchmark": "interpreter",
        "device": args.device,
        "device_name": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {
            "taps": [{"channels": c, "resolution": r} for c, r in spec],
            "in_features": sum(c for c, _ in spec),
            "size": args.size,
            "batch": args.batch,
            "heads": args.heads,
            "classes": args.classes,
            "hidden": list(default_hidden(args.classes)),
            "repeats": args.repeats,
            "band_elements": args.band_elements,
        },
        "results": results,
        "ratios": ratios,
        "max_abs_diff": max_abs_diff,
        "wall_s": wall,
        "cpu_s_used_by_other_processes": others,
    }
    mib = 2**20
    print(f"Style Interpreter, {args.size}px, D={report['config']['in_features']}, {args.heads} heads, "
          f"{args.classes} classes, batch {args.batch}, {args.device} ({device}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<8} {'median s':>10} {'runs s':>24} {'peak MiB':>10}")
    for v in VARIANTS:
        r = results[v]
        runs = " ".join(f"{t:.3f}" for t in r["times_s"])
        print(f"{v:<8} {r['median_s']:>10.3f} {runs:>24} {r['peak_bytes'] / mib:>10.1f}")
    print(f"naive/fast: time {ratios['time_naive_over_fast']:.1f}x, memory {ratios['memory_naive_over_fast']:.1f}x; "
          f"max |fast - naive| = {max_abs_diff:.2e}")
    if others is not None:
        print(f"other processes used {others:.1f} CPU-s during the {wall:.0f} s run (timings are only "
              "comparable when this is small)")
    write_results(report, args.out)


if __name__ == "__main__":
    main()
