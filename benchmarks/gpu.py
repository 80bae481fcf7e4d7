"""The GPU benchmark: labeled vs bare samples/s and peak GPU memory at realistic model sizes, in one run.

Prepared to run in under 8 minutes on one H100/H200 (`python benchmarks/gpu.py`); `--smoke` runs the
same code at toy sizes on any machine (the test suite does, on CPU). Cases, all random weights:

- stylegan2-256 / stylegan2-512: the official `--cfg=stylegan2` generator shape (z = w = 512, 8 mapping
  layers, channel_base 32768, channel_max 512) with every conv layer and toRGB tapped, and the
  10-head Style Interpreter on 20 classes (D = 5,000+ input channels);
- sd15-512-bf16: an SD-1.5-shaped pipeline (UNet 320-640-1280-1280, CLIP-L-sized text encoder, the
  SD VAE) at 512 px in bfloat16, 20 DDIM steps, guidance 7.5, with the perception decoder
  (segmentation + depth).

For each case, on the same seeds and batch:
- bare: the backbone and the decoder's forward passes only (no encoding, no writing);
- labeled: `labeling.build_shard` into a local folder: the same passes, plus encoding on
  `generate.encode_threads` threads beside the model, the shard writers and publishing;
- the variants `generate.channels_last` and `generate.compile` of the labeled pipeline (time
  permitting; compile time is reported apart from steady-state throughput).
Reported: samples/s of each, labeled/bare, peak GPU memory (`torch.cuda.max_memory_allocated`), and
the share of the labeled run the GPU was busy (nvidia-smi's utilization, sampled every 100 ms). Scaling
over several GPUs is benchmarks/generate.py's job (`--gpus-per-actor 1 --actors 1,N`).

    python benchmarks/gpu.py [--smoke] [--cases stylegan2-256,stylegan2-512,sd15-512-bf16]
        [--budget-s 420] [--out benchmarks/results/gpu.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from machine import git_revision, write_results  # noqa: E402  (benchmarks/machine.py)

MIB = 2**20
CASES = ("stylegan2-256", "stylegan2-512", "sd15-512-bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining variants past this wall time")
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device: check that the script runs")
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    return p.parse_args(argv)


class GpuBusy(threading.Thread):
    """Mean GPU utilization (%) while it runs, from `nvidia-smi` every 100 ms; None without one."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.values: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)

    def run(self) -> None:
        if self.proc is not None:
            for line in self.proc.stdout:
                try:
                    self.values.append(float(line.strip()))
                except ValueError:
                    continue

    def stop(self) -> float | None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        self.join(timeout=2)
        return round(sum(self.values) / len(self.values), 1) if self.values else None


def case_config(name: str, smoke: bool, workdir: str, device: str):
    """(FactoryConfig, number of samples) of a case; smoke mode shrinks every size."""
    from factory.config import load_config

    common = [f"workdir={workdir}", "generate.drop_uncertain=0", "generate.formats=[parquet]",
              f"generate.gpus_per_actor={1 if device == 'cuda' else 0}", "generate.encode_threads=4"]
    if name.startswith("stylegan2"):
        res = 32 if smoke else int(name.split("-")[1])
        arch = (["backbone.stylegan2.channel_max=16", "backbone.stylegan2.z_dim=32", "backbone.stylegan2.w_dim=32"]
                if smoke else ["backbone.stylegan2.z_dim=512", "backbone.stylegan2.w_dim=512",
                               "backbone.stylegan2.mapping_layers=8", "backbone.stylegan2.channel_base=32768",
                               "backbone.stylegan2.channel_max=512"])
        batch = 8 if smoke else (32 if res <= 256 else 16)
        classes = "[" + ",".join(f"c{i}" for i in range(20)) + "]"
        cfg = load_config(None, [*common, f"backbone.stylegan2.resolution={res}", *arch, "decoder.num_heads=10",
                                 f"labels.classes={classes}", f"generate.batch_size={batch}"])
        return cfg, (2 if smoke else 8) * batch
    res, batch = (64, 2) if smoke else (512, 8)
    cfg = load_config(None, [*common, "backbone.kind=diffusion", "decoder.kind=perception",
                             "decoder.tasks=[segmentation,depth]", f"decoder.dim={64 if smoke else 256}",
                             "decoder.num_heads=5", f"backbone.diffusion.resolution={res}",
                             f"backbone.diffusion.steps={2 if smoke else 20}",
                             f"backbone.diffusion.dtype={'float32' if device == 'cpu' else 'bfloat16'}",
                             f"generate.batch_size={batch}"])
    return cfg, (1 if smoke else 4) * batch


def build_models(cfg, name: str, smoke: bool, workdir: str, device: str):
    from factory.backbones import load_backbone
    from factory.decoders import FittedDecoder, build_decoder

    if name.startswith("sd15") and not smoke and cfg.backbone.weights is None:
        from diffusion import build_realistic_pipeline  # benchmarks/diffusion.py

        folder = os.path.join(workdir, "sd15")
        build_realistic_pipeline().save_pretrained(folder, safe_serialization=True)
        cfg.backbone.weights = folder
    backbone = load_backbone(cfg.backbone, device)
    labels = cfg.label_names()
    model = build_decoder(cfg.decoder, backbone.feature_channels, len(labels)).eval().requires_grad_(False).to(device)
    decoder = FittedDecoder(model, cfg.decoder, labels, backbone.feature_channels, backbone.weights_hash, [])
    return backbone, decoder


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def bare(backbone, decoder, cfg, seeds: list[int], device: str) -> dict:
    import torch

    from factory.recipes import labeling

    batches = [seeds[i:i + cfg.generate.batch_size] for i in range(0, len(seeds), cfg.generate.batch_size)]
    size = (backbone.resolution, backbone.resolution)
    texts = ["a photo of a face"] if cfg.backbone.kind == "diffusion" else None
    with torch.inference_mode():
        decoder(backbone(batches[0], labeling.prompts_for(batches[0], texts, 0)).features, size)  # warm-up
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        for b in batches:
            decoder(backbone(b, labeling.prompts_for(b, texts, 0)).features, size)
        sync(device)
    wall = time.perf_counter() - t0
    return {"samples": len(seeds), "seconds": round(wall, 3), "samples_per_s": round(len(seeds) / wall, 3),
            "peak_gpu_memory_bytes": peak(device)}


def labeled(backbone, decoder, cfg, seeds: list[int], device: str, workdir: str, tag: str) -> dict:
    """`build_shard` over `seeds` after a one-batch warm-up shard (compile and first-call costs)."""
    from factory.dataset.layout import ShardSpec
    from factory.recipes import labeling

    texts = ["a photo of a face"] if cfg.backbone.kind == "diffusion" else None
    g = cfg.generate
    g.output = os.path.join(workdir, f"out-{tag}")
    t0 = time.perf_counter()
    labeling.build_shard(backbone, decoder, cfg, ShardSpec(0, 0, g.batch_size), "bench", None, texts)
    warmup = time.perf_counter() - t0
    reset_peak(device)
    busy = GpuBusy()
    busy.start()
    t0 = time.perf_counter()
    record = labeling.build_shard(backbone, decoder, cfg, ShardSpec(1, seeds[0], seeds[-1] + 1), "bench", None, texts)
    wall = time.perf_counter() - t0
    return {"samples": len(seeds), "seconds": round(wall, 3), "samples_per_s": round(len(seeds) / wall, 3),
            "warmup_s": round(warmup, 2), "peak_gpu_memory_bytes": peak(device), "gpu_busy_percent": busy.stop(),
            "bytes": record["bytes"], "timings": record["timings"]}


def run_case(name: str, args: argparse.Namespace, device: str, started: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{name}-") as workdir:
        cfg, n = case_config(name, args.smoke, workdir, device)
        t0 = time.perf_counter()
        backbone, decoder = build_models(cfg, name, args.smoke, workdir, device)
        out = {"case": name, "device": device, "batch_size": cfg.generate.batch_size, "samples": n,
               "resolution": backbone.resolution, "decoder_in_channels": sum(backbone.feature_channels),
               "model_build_s": round(time.perf_counter() - t0, 1)}
        seeds = list(range(1000, 1000 + n))
        out["bare"] = bare(backbone, decoder, cfg, seeds, device)
        out["labeled"] = labeled(backbone, decoder, cfg, seeds, device, workdir, "default")
        out["labeled_over_bare"] = round(out["labeled"]["samples_per_s"] / out["bare"]["samples_per_s"], 3)
        for flag in ("channels_last", "compile"):
            if time.perf_counter() - started > args.budget_s:
                out[flag] = "skipped: over the time budget"
                continue
            variant_cfg, _ = case_config(name, args.smoke, workdir, device)
            variant_cfg.backbone.weights = cfg.backbone.weights
            setattr(variant_cfg.generate, flag, True)
            vb, vd = build_models(variant_cfg, name, args.smoke, workdir, device)
            vb.accelerate(compile=variant_cfg.generate.compile, channels_last=variant_cfg.generate.channels_last)
            try:
                result = labeled(vb, vd, variant_cfg, seeds, device, workdir, flag)
                result["over_default"] = round(result["samples_per_s"] / out["labeled"]["samples_per_s"], 3)
            except Exception as e:  # a variant that does not run here is a finding, not a crash
                result = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            out[flag] = result
            del vb, vd
        return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("gpu.py needs a CUDA device (or --smoke for toy sizes on any device)")
    started = time.perf_counter()
    results = []
    for name in args.cases.split(","):
        if name not in CASES:
            sys.exit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
        print(f"{name} ...", flush=True)
        results.append(run_case(name, args, device, started))
        r = results[-1]
        gpu = r["labeled"]["peak_gpu_memory_bytes"]
        print(f"{name}: bare {r['bare']['samples_per_s']:.1f}/s, labeled {r['labeled']['samples_per_s']:.1f}/s "
              f"({r['labeled_over_bare']:.2f}x), peak GPU memory "
              f"{'-' if gpu is None else f'{gpu / MIB:.0f} MiB'}, GPU busy {r['labeled']['gpu_busy_percent']}%", flush=True)
    report = {
        "benchmark": "gpu", "smoke": args.smoke, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "git": git_revision(),
        "cases": results, "wall_s": time.perf_counter() - started,
    }
    write_results(report, args.out)


if __name__ == "__main__":
    main()
