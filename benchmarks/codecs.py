"""PNG encoders side by side: the one the factory uses (PIL, through `factory.dataset.sample.png`)
against the fast codec libraries a user may have installed, on the images a build encodes.

    python benchmarks/codecs.py [--sizes 32,256,512] [--level 1] [--out benchmarks/results/codecs.json]

For each size: a smooth RGB image (what a generator draws) and an 8-class mask, encoded at zlib
`--level` by every encoder found (`imagecodecs.png_encode`, OpenCV's `cv2.imencode`; each skipped
with a note when not installed), one thread, microseconds per image and bytes. Every encoder's output
is decoded back with PIL and checked to hold the same pixels. The factory keeps PIL unless another
encoder wins at the sizes real builds use (256 px and up), where zlib, not the wrapper, is the cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import busy_cpu_seconds, git_revision, write_results  # noqa: E402  (benchmarks/machine.py)


def images(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(size)
    noise = rng.integers(0, 32, (size, size, 3), dtype=np.int64)
    rgb = np.clip(np.cumsum(noise, axis=1) * 255 // max(1, int(np.cumsum(noise, axis=1).max())), 0, 255)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy * 8 // size + xx * 8 // size) % 8).astype(np.uint8)
    return {"rgb": rgb.astype(np.uint8), "mask": mask}


def encoders(level: int) -> tuple[dict, dict[str, str]]:
    from factory.dataset.sample import png

    found = {"pil (factory)": lambda a: png(a, level)}
    missing = {}
    try:
        import imagecodecs

        found["imagecodecs"] = lambda a: bytes(imagecodecs.png_encode(a, level=level))
    except ImportError as e:
        missing["imagecodecs"] = str(e)
    try:
        import cv2

        found["opencv"] = lambda a: cv2.imencode(".png", a[..., ::-1] if a.ndim == 3 else a,
                                                 [cv2.IMWRITE_PNG_COMPRESSION, level])[1].tobytes()
    except ImportError as e:
        missing["opencv"] = str(e)
    return found, missing


def measure(encode, array: np.ndarray, seconds: float) -> dict:
    from factory.dataset.sample import decode_png

    data = encode(array)
    if not np.array_equal(decode_png(data), array):
        raise AssertionError("decoded pixels differ from the encoded ones")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        encode(array)
        n += 1
    return {"us_per_image": 1e6 * (time.perf_counter() - t0) / n, "bytes": len(data), "images": n}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,256,512")
    p.add_argument("--level", type=int, default=1, help="zlib level (generate.png_compression)")
    p.add_argument("--seconds", type=float, default=1.0, help="per encoder, size and image kind")
    p.add_argument("--out", default="benchmarks/results/codecs.json")
    args = p.parse_args(argv)
    started, busy0 = time.perf_counter(), busy_cpu_seconds()
    found, missing = encoders(args.level)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for kind, array in images(size).items():
            base = None
            for name, encode in found.items():
                r = {"size": size, "kind": kind, "encoder": name, **measure(encode, array, args.seconds)}
                base = base or r["us_per_image"]
                r["speedup_over_pil"] = base / r["us_per_image"]
                results.append(r)
                print(f"{size:>5}px {kind:<5} {name:<14} {r['us_per_image']:>9.1f} us {r['bytes']:>8} B "
                      f"{r['speedup_over_pil']:>5.2f}x")
    for name, why in missing.items():
        print(f"{name}: not installed ({why})")
    wall = time.perf_counter() - started
    busy1 = busy_cpu_seconds()
    report = {"benchmark": "codecs", "platform": platform.platform(), "python": platform.python_version(),
              "git": git_revision(), "level": args.level, "results": results, "not_installed": missing,
              # one thread measured: anything above wall time means other work competed
              "cpu_s_used_by_machine": None if busy0 is None else round(busy1 - busy0, 2),
              "wall_s": wall}
    write_results(report, args.out)
    return report


if __name__ == "__main__":
    main()
