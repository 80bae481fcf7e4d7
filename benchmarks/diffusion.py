"""Diffusion labeling: labeled samples/s vs the bare diffusers pipeline's unlabeled samples/s.

Four phases on the same weights, seeds, prompts, steps, guidance, resolution and batch size, timed
in one process, interleaved batch by batch (the phase order rotates every batch, so drift in the
machine's speed falls on all of them), after one warm-up batch each:

1. bare: a plain `StableDiffusionPipeline` loaded from the same folder by the factory's own loader
   (`load_pipeline`, the scheduler from `make_scheduler`, progress bar off), called as the backbone
   calls it (`output_type="pt"`, one CPU generator per seed). A separate pipeline: the factory's
   backbone installs forward hooks and attention processors on its own. Its images are checked to be
   identical to the backbone's.
2. backbone: `DiffusionBackbone(seeds, prompts)`: the same sampling plus the feature taps (block
   hooks, cross-attention maps at the tapped step) and the uint8 image conversion.
3. backbone + decoder: the above, then the perception decoder on the features (no encoding).
4. labeled: `factory.recipes.labeling.label_seeds` (the backbone, the decoder, PNG encoding of image, mask
   and 16-bit depth, row building): what a build does per batch, less writing.

The decoder is a seeded, untrained perception decoder saved with `save_decoder` and loaded with
`load_decoder`, as `factory train` publishes one (throughput does not depend on training). The
pipeline is saved with `save_pretrained` and loaded through `backbone.weights=<folder>`, the path a
user's checkpoint takes: by default the tiny pipeline of `--family` (`tiny_families`); `--realistic`
is the realistic-size pipeline of `--family sd|sdxl|flux` with random weights (`benchmarks/realistic.py`:
SD 1.5 at 512 px, SDXL base at 1024 px, a FLUX.1-sized 19 + 38 block transformer at 1024 px), made
on the device and stored in the dtype it runs in (`dtype: auto`: bfloat16 on an H100/H200), meant
for a GPU. `--smoke` runs the same realistic code at toy sizes (64 px, 2 seeds, 2 steps) on any
device, without the CPU memory subprocesses (a GPU run measures memory in-process): the test suite
runs it, so the GPU script is known to work.

Prepared GPU runs, each under 8 minutes on one H200 (estimated, not yet run on one: FLUX-size is
12B parameters, 24 GB in bfloat16, loaded twice):

    python benchmarks/diffusion.py --realistic --family sdxl    # 16 seeds, batch 4, 10 steps, 1024 px
    python benchmarks/diffusion.py --realistic --family flux    # 8 seeds, batch 2, 10 steps, 1024 px

Peak memory per phase: on CUDA, in the timing process, per batch: `max_memory_allocated` above what
was allocated before the batch, plus the bytes of the phase's own weights (the bare pipeline's, or
the backbone's [+ the decoder's]), i.e. what a process holding only that phase's models would peak
at; the max over batches. On CPU, each phase runs again in a fresh subprocess (only its own models
loaded and paged in, then a warm-up batch and `--memory-batches` batches): the peak RSS while it samples
(Linux's VmHWM, reset after loading through /proc/self/clear_refs, so the loading spikes, which are
the same for every phase, do not hide it: interpreter, libraries, weights and activations) and that
peak's growth above the RSS after loading; also the process's lifetime peak (ru_maxrss).

    python benchmarks/diffusion.py [--samples 64] [--batch-size 8] [--steps 10] [--guidance 7.5]
        [--device auto|cpu|cuda] [--realistic [--smoke]] [--family sd|sdxl|sd3|flux] [--skip-memory]
        [--out benchmarks/results/diffusion.json] [key=value ...]

Trailing `key=value` arguments override the config (`--config`, default configs/diffusion.yaml) for
every phase. `--realistic` on a CPU is refused unless `--samples` is at most 2 (a code-path check) or
with `--smoke`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from machine import busy_cpu_seconds, git_revision, write_results  # noqa: E402  (benchmarks/machine.py)

PHASES = ("bare", "backbone", "backbone_decoder", "labeled")
LABELS = {
    "bare": "bare diffusers pipeline",
    "backbone": "factory backbone (taps)",
    "backbone_decoder": "backbone + decoder",
    "labeled": "label_seeds (+ PNG encode)",
}
MIB = 2**20
REALISTIC_CPU_MAX_SAMPLES = 2
REALISTIC_GPU_RUN = {"sd": (64, 8), "sdxl": (16, 4), "flux": (8, 2)}
"""(seeds, batch size) of a realistic run on a GPU by default: under 8 minutes on one H200."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=None,
                   help="seeds per phase (default 64; --realistic: sd 64, sdxl 16, flux 8; on CPU 1; --smoke 2)")
    p.add_argument("--batch-size", type=int, default=None, help="seeds per pipeline call (default 8; --realistic: "
                   "sd 8, sdxl 4, flux 2)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size in pixels (default: the config's; --realistic: sd 512, sdxl/flux 1024; --smoke 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPUs this process may use)")
    p.add_argument("--realistic", action="store_true",
                   help="the realistic-size random-weight pipeline of --family sd|sdxl|flux (GPU)")
    p.add_argument("--smoke", action="store_true", help="with --realistic: the same code at toy sizes, any device")
    p.add_argument("--family", choices=["sd", "sdxl", "sd3", "flux"], default="sd",
                   help="the pipeline's family (tiny: tiny_families.build_tiny; --realistic: realistic.build_realistic)")
    p.add_argument("--memory-batches", type=int, default=2, help="CPU: batches per fresh memory subprocess")
    p.add_argument("--skip-memory", action="store_true",
                   help="CPU: timing only, no per-phase memory subprocesses (half the run on a busy machine)")
    p.add_argument("--config", default="configs/diffusion.yaml")
    p.add_argument("--out", default="benchmarks/results/diffusion.json")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one CPU memory phase
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # internal: where the models were saved
    args = p.parse_args(argv)
    if any(v is not None and v < 1 for v in (args.samples, args.batch_size, args.steps, args.memory_batches)):
        p.error("--samples, --batch-size, --steps and --memory-batches must be >= 1")
    if args.smoke and not args.realistic:
        p.error("--smoke is the realistic code at toy sizes: pass it with --realistic")
    if args.realistic and args.family not in REALISTIC_GPU_RUN:
        p.error(f"--realistic --family {args.family}: realistic shapes are written for "
                f"{', '.join(REALISTIC_GPU_RUN)}; run --family {args.family} without --realistic (the tiny one)")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu_samples, gpu_batch = REALISTIC_GPU_RUN.get(args.family, (64, 8)) if args.realistic else (64, 8)
    if args.samples is None:
        args.samples = 2 if args.smoke else (1 if args.realistic and args.device == "cpu" else gpu_samples)
    if args.smoke:
        args.steps = min(args.steps, 2)
    if args.realistic and not args.smoke and args.device == "cpu" and args.samples > REALISTIC_CPU_MAX_SAMPLES:
        p.error(f"--realistic on a CPU takes minutes per sample ({args.family} size); run it on a GPU, or pass "
                f"--samples {REALISTIC_CPU_MAX_SAMPLES} or fewer (and small --steps/--resolution) to check the code "
                "path, or --smoke for toy sizes")
    if args.resolution is None and args.realistic:
        from realistic import RESOLUTION

        args.resolution = 64 if args.smoke else RESOLUTION[args.family]
    args.batch_size = min(args.batch_size or (1 if args.smoke else gpu_batch), args.samples)
    return args


def model_name(args: argparse.Namespace) -> str:
    if not args.realistic:
        return f"tiny {args.family}"
    return f"{args.family}-shaped random-weight" + (" (smoke: toy sizes)" if args.smoke else "")


def set_threads(args: argparse.Namespace) -> int:
    import torch

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# ---------------------------------------------------------------- models

def save_pipeline(args: argparse.Namespace, directory: str) -> dict:
    """The benchmark's pipeline, `save_pretrained` to `directory`; returns its parameter counts."""
    import torch

    t0 = time.perf_counter()
    if args.realistic:  # made on the device, stored in the dtype it runs in: half the bytes to write and read
        from realistic import build_realistic

        from factory.backbones.diffusion import torch_dtype

        pipe = build_realistic(args.family, args.smoke, args.device, torch_dtype("auto", torch.device(args.device)))
        pipe.save_pretrained(directory, safe_serialization=True)
    else:
        from factory.backbones.tiny_families import build_tiny

        pipe = build_tiny(args.family, 0)
        pipe.save_pretrained(directory, safe_serialization=True)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in pipe.components.items()
              if isinstance(part, torch.nn.Module)}
    return {**counts, "build_and_save_s": round(time.perf_counter() - t0, 2)}


def config_overrides(args: argparse.Namespace, workdir: str) -> list[str]:
    out = [f"workdir={workdir}", "backbone.kind=diffusion", f"backbone.weights={os.path.join(workdir, 'pipeline')}",
           "decoder.kind=perception", f"backbone.diffusion.steps={args.steps}",
           f"backbone.diffusion.guidance_scale={args.guidance}", f"generate.batch_size={args.batch_size}",
           f"generate.num_samples={args.samples}", f"generate.decoder={os.path.join(workdir, 'decoder')}"]
    if args.resolution is not None:
        out.append(f"backbone.diffusion.resolution={args.resolution}")
    return out + list(args.overrides)


def load(args: argparse.Namespace, workdir: str):
    from factory.config import load_config

    return load_config(args.config, config_overrides(args, workdir))


def save_decoder_for(cfg, backbone) -> None:
    from factory.decoders import build_decoder
    from factory.decoders.files import save_decoder

    model = build_decoder(cfg.decoder, backbone.feature_channels, len(cfg.labels.classes))
    save_decoder(cfg.generate.decoder, model, cfg.decoder, cfg.labels.classes, backbone.feature_channels,
                 backbone.weights_hash, "bench: untrained", [])


def bare_pipeline(cfg, device: str):
    """The same folder through the factory's loader, minus the backbone's hooks and processors."""
    import torch

    from factory.backbones.diffusion import load_pipeline, make_scheduler, torch_dtype

    d = cfg.backbone.diffusion
    pipe = load_pipeline(cfg.backbone.weights, cfg.backbone.init_seed, torch_dtype(d.dtype, torch.device(device)))
    pipe.scheduler = make_scheduler(d.scheduler, pipe)
    pipe.set_progress_bar_config(disable=True)
    for part in model_parts(pipe):
        part.eval().requires_grad_(False)
    return pipe.to(device)


def model_parts(pipe) -> list:
    """The pipeline's torch modules (denoiser, VAE, text encoders), whatever its family."""
    import torch

    return [part for part in pipe.components.values() if isinstance(part, torch.nn.Module)]


def texts_for(cfg) -> list[str]:
    from factory.data import prompts

    return [p.text for p in prompts.from_template(cfg.prompts.template, cfg.labels.classes, cfg.prompts.attributes,
                                                  cfg.prompts.seed)]


def module_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


class Phases:
    """The models each phase needs (only those: a memory subprocess loads one phase's) and one call
    per phase: seeds -> whatever that phase produces."""

    def __init__(self, cfg, device: str, needed: tuple[str, ...], texts: list[str]) -> None:
        self.cfg, self.device, self.texts = cfg, device, texts
        self.pipe = self.backbone = self.decoder = None
        if "bare" in needed:
            self.pipe = bare_pipeline(cfg, device)
        if any(p != "bare" for p in needed):
            from factory.backbones import load_backbone

            self.backbone = load_backbone(cfg.backbone, device)
        if "backbone_decoder" in needed or "labeled" in needed:
            from factory.decoders.files import load_decoder

            self.decoder = load_decoder(cfg.generate.decoder, device)
        d = cfg.backbone.diffusion
        self.steps, self.guidance, self.resolution = d.steps, d.guidance_scale, d.resolution

    def modules(self) -> list:
        out = []
        for pipe in (self.pipe, self.backbone.pipe if self.backbone else None):
            if pipe is not None:
                out += model_parts(pipe)
        return out + ([self.decoder.model] if self.decoder else [])

    def touch_weights(self) -> None:
        """Read every weight once, so lazily mapped files are resident."""
        import torch

        with torch.no_grad():
            for m in self.modules():
                for t in [*m.parameters(), *m.buffers()]:
                    t.sum()

    def prompts(self, seeds: list[int]) -> list[str]:
        from factory.recipes.labeling import prompts_for

        return prompts_for(seeds, self.texts, self.cfg.generate.start_seed)

    def weight_bytes(self, phase: str) -> int:
        if phase == "bare":
            return module_bytes(*model_parts(self.pipe))
        extra = (self.decoder.model,) if phase in ("backbone_decoder", "labeled") else ()
        return module_bytes(*model_parts(self.backbone.pipe), *extra)

    def run(self, phase: str, seeds: list[int]):
        import torch

        with torch.inference_mode():  # every phase alike: the build's forward passes run under it
            return self._run(phase, seeds)

    def _run(self, phase: str, seeds: list[int]):
        import torch

        if phase == "bare":
            return self.pipe(
                prompt=self.prompts(seeds), num_inference_steps=self.steps, guidance_scale=self.guidance,
                height=self.resolution, width=self.resolution,
                generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds], output_type="pt",
            ).images
        if phase == "backbone":
            return self.backbone(seeds, self.prompts(seeds))
        if phase == "backbone_decoder":
            out = self.backbone(seeds, self.prompts(seeds))
            return out, self.decoder(out.features, (self.resolution, self.resolution))
        from factory.recipes.labeling import label_seeds

        return label_seeds(self.backbone, self.decoder, seeds, 0, self.cfg, "bench", self.texts)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def batches_of(cfg, samples: int, batch_size: int) -> list[list[int]]:
    start = cfg.generate.start_seed
    seeds = list(range(start, start + samples))
    return [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]


# ---------------------------------------------------------------- memory on CPU (fresh processes)

def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's lifetime peak RSS."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Restart Linux's RSS high-water mark (VmHWM) from the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_memory_phase(args: argparse.Namespace) -> None:
    """Internal: one phase alone in this fresh process; JSON on stdout's last line."""
    set_threads(args)
    quiet()
    cfg = load(args, args.workdir)
    rss_start = current_rss()
    phases = Phases(cfg, args.device, (args.phase,), texts_for(cfg))
    batches = batches_of(cfg, args.memory_batches * args.batch_size, args.batch_size)
    phases.touch_weights()  # safetensors weights load lazily (mmap): page them in so "above loaded" means working memory
    lifetime_before = peak_rss()
    if not reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): per-phase CPU memory needs Linux")
    rss_loaded = current_rss()
    t0 = time.perf_counter()
    phases.run(args.phase, batches[0])  # warm-up
    for batch in batches:
        phases.run(args.phase, batch)
    seconds = time.perf_counter() - t0
    peak = peak_rss_since_reset()
    print(json.dumps({
        "phase": args.phase, "batches": len(batches) + 1, "seconds": seconds,
        "rss_before_load_bytes": rss_start, "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak, "peak_above_loaded_bytes": peak - rss_loaded,
        "lifetime_peak_rss_before_sampling_bytes": lifetime_before, "lifetime_peak_rss_bytes": peak_rss(),
        "weight_bytes": phases.weight_bytes(args.phase),
    }))


def memory_in_subprocesses(args: argparse.Namespace, workdir: str) -> dict:
    out = {}
    for phase in PHASES:
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--workdir", workdir,
               "--samples", str(args.samples), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--guidance", str(args.guidance), "--device", args.device, "--config", args.config,
               "--memory-batches", str(args.memory_batches)]
        if args.resolution is not None:
            cmd += ["--resolution", str(args.resolution)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.realistic:
            cmd.append("--realistic")
        cmd += ["--family", args.family]
        done = subprocess.run([*cmd, *args.overrides], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"memory subprocess for {phase} failed:\n{done.stderr[-4000:]}")
        out[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- timing (one process, interleaved)

def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(phases: Phases, batches: list[list[int]], device: str) -> tuple[dict, dict]:
    """Seconds per phase per batch (interleaved, rotating order) and, on CUDA, peak memory."""
    import torch

    cuda = device == "cuda"
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    peaks = dict.fromkeys(PHASES, 0)
    checks: dict = {}
    for phase in PHASES:  # warm-up: first-call allocations, kernel choices, lazy imports
        out = phases.run(phase, batches[0])
        sync(device)
        if phase == "bare":
            bare_images = (out.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
            checks["bare_nonfinite_pixels"] = int((~torch.isfinite(out)).sum())
        elif phase == "backbone":
            diff = (bare_images.int() - out.images.int()).abs().max()
            checks["max_abs_diff_bare_vs_backbone_images"] = int(diff)
            checks["feature_shapes"] = [list(f.shape) for f in out.features]
        elif phase == "labeled":
            checks["mean_png_bytes"] = {k: sum(len(r[k]) for r in out) / len(out)
                                        for k in ("image", "mask", "depth") if out[0].get(k) is not None}
        del out
    for i, batch in enumerate(batches):
        order = PHASES[i % len(PHASES):] + PHASES[: i % len(PHASES)]
        for phase in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync(device)
            t0 = time.perf_counter()
            out = phases.run(phase, batch)
            sync(device)
            times[phase].append(time.perf_counter() - t0)
            del out
            if cuda:
                peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated() - base)
    memory = {}
    if cuda:
        for phase in PHASES:
            w = phases.weight_bytes(phase)
            memory[phase] = {"peak_bytes": w + peaks[phase], "weight_bytes": w, "peak_above_start_bytes": peaks[phase]}
    return {"times": times, "checks": checks}, memory


# ---------------------------------------------------------------- report

def print_report(report: dict) -> None:
    s, res = report["settings"], report["phases"]
    print(f"diffusion: {s['model']} pipeline, {s['resolution']} px, {s['steps']} {s['scheduler']} steps, guidance "
          f"{s['guidance']}, batch {s['batch_size']}, {s['samples']} seeds per phase, {s['dtype']} on "
          f"{report['device_name']}, {report['threads']} threads; torch {report['torch']}, "
          f"diffusers {report['diffusers']}")
    mem_head = "peak GPU MiB" if report["device"] == "cuda" else "peak RSS MiB (above loaded)"
    print(f"{'phase':<28} {'samples':>7} {'seconds':>8} {'samples/s':>9} {'vs bare':>7} {mem_head:>28}")
    for phase in PHASES:
        r = res[phase]
        m = r["memory"]
        if "skipped" in m:
            mem = f"skipped ({m['skipped']})"
        elif report["device"] == "cuda":
            mem = f"{m['peak_bytes'] / MIB:.0f}"
        else:
            mem = f"{m['peak_rss_bytes'] / MIB:.0f} ({m['peak_above_loaded_bytes'] / MIB:.0f})"
        print(f"{LABELS[phase]:<28} {r['samples']:>7} {r['seconds']:>8.2f} {r['samples_per_s']:>9.2f} "
              f"{r['ratio_to_bare']:>7.3f} {mem:>28}")
    o = report["overhead_ms_per_sample"]
    ratio = report["ratios"]["labeled_over_bare"]
    print(f"labeled/bare = {ratio:.3f} (goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); overhead per sample: "
          f"taps {o['taps']:.1f} ms, decoder {o['decoder']:.1f} ms, encode+rows {o['encode']:.1f} ms "
          f"(bare {o['bare']:.1f} ms)")
    c = report["checks"]
    print(f"bare vs backbone images: max |diff| {c['max_abs_diff_bare_vs_backbone_images']} grey levels; "
          f"non-finite bare pixels {c['bare_nonfinite_pixels']}; mean PNG bytes "
          + ", ".join(f"{k} {v:.0f}" for k, v in c.get("mean_png_bytes", {}).items()))
    if report["device"] == "cuda":
        print("peak GPU memory: max over batches of max_memory_allocated above the batch's start, plus the phase's "
              "own weights")
    elif "skipped" not in res["labeled"]["memory"]:
        print("peak RSS: each phase alone in a fresh process (its models only), the peak while it samples (warm-up + "
              f"{s['memory_batches']} batches; VmHWM reset after loading), in brackets its growth above the RSS after "
              "loading")
    if report["cpu_s_used_by_other_processes"] is not None:
        print(f"other processes used {report['cpu_s_used_by_other_processes']:.1f} CPU-s during the "
              f"{report['timing_wall_s']:.0f} s timed loop (timings are only comparable when this is small)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase:
        run_memory_phase(args)
        return
    import diffusers
    import torch
    import transformers

    from factory.backbones.diffusion import torch_dtype

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    threads = set_threads(args)
    quiet()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as workdir:
        print(f"building the {model_name(args)} pipeline ...", flush=True)
        params = save_pipeline(args, os.path.join(workdir, "pipeline"))
        cfg = load(args, workdir)
        texts = texts_for(cfg)
        t0 = time.perf_counter()
        phases = Phases(cfg, args.device, ("bare", "backbone"), texts)  # the decoder is saved first, below
        load_s = time.perf_counter() - t0
        save_decoder_for(cfg, phases.backbone)
        from factory.decoders.files import load_decoder

        phases.decoder = load_decoder(cfg.generate.decoder, args.device)
        batches = batches_of(cfg, args.samples, args.batch_size)
        print(f"timing {len(PHASES)} phases x {args.samples} seeds, interleaved ...", flush=True)
        busy, own, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        timing, memory = measure(phases, batches, args.device)
        timing_wall = time.perf_counter() - t0
        busy_end, own_end = busy_cpu_seconds(), own_cpu_seconds()
        others = None if busy is None else max(0.0, (busy_end - busy) - (own_end - own))
        weights = {p: phases.weight_bytes(p) for p in PHASES}
        del phases
        if args.device == "cpu" and not (args.smoke or args.skip_memory):
            print("memory: each phase in a fresh process ...", flush=True)
            memory = memory_in_subprocesses(args, workdir)
        elif args.device == "cpu":
            memory = {p: {"skipped": "--smoke" if args.smoke else "--skip-memory"} for p in PHASES}

    res = {}
    for phase in PHASES:
        seconds = sum(timing["times"][phase])
        res[phase] = {"samples": args.samples, "seconds": seconds, "samples_per_s": args.samples / seconds,
                      "per_batch_s": [round(t, 4) for t in timing["times"][phase]], "memory": memory[phase]}
    bare_rate = res["bare"]["samples_per_s"]
    for phase in PHASES:
        res[phase]["ratio_to_bare"] = res[phase]["samples_per_s"] / bare_rate
    per = {p: 1000 * res[p]["seconds"] / args.samples for p in PHASES}
    overhead = {"bare": per["bare"], "taps": per["backbone"] - per["bare"],
                "decoder": per["backbone_decoder"] - per["backbone"], "encode": per["labeled"] - per["backbone_decoder"],
                "labeled": per["labeled"]}
    d = cfg.backbone.diffusion
    report = {
        "benchmark": "diffusion",
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine()),
        "git": git_revision(),
        "settings": {
            "model": model_name(args), "smoke": args.smoke,
            "family": args.family,
            "parameters": params, "samples": args.samples, "batch_size": args.batch_size, "steps": d.steps,
            "guidance": d.guidance_scale, "resolution": d.resolution, "scheduler": d.scheduler,
            "dtype": str(torch_dtype(d.dtype, torch.device(args.device))).replace("torch.", ""),
            "memory_batches": args.memory_batches, "config": args.config, "overrides": list(args.overrides),
            "num_prompts": len(texts), "model_load_s": round(load_s, 2), "weight_bytes": weights,
            "backbone": asdict(cfg.backbone), "decoder": asdict(cfg.decoder), "labels": asdict(cfg.labels),
        },
        "phases": res,
        "ratios": {"labeled_over_bare": res["labeled"]["ratio_to_bare"],
                   "backbone_over_bare": res["backbone"]["ratio_to_bare"],
                   "backbone_decoder_over_bare": res["backbone_decoder"]["ratio_to_bare"]},
        "goal_labeled_over_bare": 0.9,
        "overhead_ms_per_sample": overhead,
        "checks": timing["checks"],
        "timing_wall_s": timing_wall,
        "cpu_s_used_by_other_processes": others,
        "wall_s": time.perf_counter() - started,
    }
    print_report(report)
    write_results(report, args.out)


if __name__ == "__main__":
    main()
