"""Toy-world rendering speed: scenes per second, one process and one per core, side by side.

    python benchmarks/toyworld.py [--size 64] [--batch 256] [--seconds 5] [--out benchmarks/results/toyworld.json]

One process renders batches of `--batch` seeds with `render_batch` for `--seconds`; then one process per
core does the same at once. Also reported: the cost of writing a labeled folder (PNG encoding and
COCO RLE included) per scene, which is what `factory toyworld` pays, and the peak RSS per process.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import busy_cpu_seconds, write_results  # noqa: E402  (benchmarks/machine.py)


def render_for(seconds: float, size: int, batch: int, offset: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    from factory.data.toyworld import render_batch

    render_batch(range(8), size)  # warm up
    done, start, t0 = 0, offset, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        render_batch(range(start, start + batch), size)
        start += batch
        done += batch
    return {"scenes": done, "seconds": time.perf_counter() - t0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", default="benchmarks/results/toyworld.json")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    busy0 = busy_cpu_seconds()
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        one = pool.apply(render_for, (args.seconds, args.size, args.batch, 0))
    with ctx.Pool(cores) as pool:
        many = pool.starmap(render_for, [(args.seconds, args.size, args.batch, 10_000_000 * (i + 1)) for i in range(cores)])
    from factory.data.toyworld import write_folder

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        write_folder(d, 500, size=args.size)
        folder_per_s = 500 / (time.perf_counter() - t0)
    busy1 = busy_cpu_seconds()
    one_rate = one["scenes"] / one["seconds"]
    many_rate = sum(r["scenes"] / r["seconds"] for r in many)
    report = {
        "benchmark": "toyworld", "size": args.size, "batch": args.batch, "cores": cores,
        "scenes_per_s_one_process": round(one_rate, 1), "scenes_per_s_all_cores": round(many_rate, 1),
        "scaling": round(many_rate / one_rate, 2), "labeled_folder_scenes_per_s": round(folder_per_s, 1),
        "peak_rss_mib_per_process": round(max(r["peak_rss_mib"] for r in [one, *many]), 1),
        "machine_busy_cpu_seconds": None if busy0 is None or busy1 is None else round(busy1 - busy0, 1),
        "python": platform.python_version(),
    }
    print(f"toy world at {args.size} px, batches of {args.batch}:")
    print(f"  one process      {one_rate:8.0f} scenes/s")
    print(f"  {cores} processes      {many_rate:8.0f} scenes/s  ({report['scaling']:.2f}x)")
    print(f"  labeled folder   {folder_per_s:8.0f} scenes/s  (PNG + COCO writing, one process)")
    print(f"  peak RSS         {report['peak_rss_mib_per_process']:8.0f} MiB per process")
    write_results(report, args.out)
    return report


if __name__ == "__main__":
    main()
