"""The benchmarks run: CI has no GPU, so the prepared GPU benchmarks' `--smoke` modes (toy sizes, any
device) run here, so the scripts a GPU session runs once are known to work end to end; the codec
comparison and the generate benchmark (`--quick`) run too."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_reports_labeled_and_bare(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--smoke", "--cases",
                    "stylegan2-256,sd15-512-bf16", "--budget-s", "0", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = json.loads(out.read_text())
    assert [c["case"] for c in report["cases"]] == ["stylegan2-256", "sd15-512-bf16"]
    for case in report["cases"]:
        assert case["bare"]["samples_per_s"] > 0 and case["labeled"]["samples_per_s"] > 0
        assert case["labeled"]["samples"] == case["bare"]["samples"] and case["labeled"]["bytes"] > 0
        assert case["compile"].startswith("skipped")


def test_codecs_benchmark_checks_round_trips_and_reports_pil(tmp_path):
    out = tmp_path / "codecs.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "codecs.py"), "--sizes", "16",
                    "--seconds", "0.01", "--out", str(out)], check=True, capture_output=True, text=True,
                   timeout=120, cwd=ROOT)
    results = json.loads(out.read_text())["results"]
    assert {(r["kind"], r["encoder"]) for r in results} >= {("rgb", "pil (factory)"), ("mask", "pil (factory)")}
    assert all(r["us_per_image"] > 0 and r["bytes"] > 0 for r in results)


@pytest.mark.slow
def test_realistic_diffusion_benchmark_smoke_runs_the_flux_sized_code(tmp_path):
    """`diffusion.py --realistic --family flux` is prepared for a GPU (19 + 38 blocks at 3072); its
    `--smoke` mode builds the same pipeline code at toy sizes, so the GPU run is known to work."""
    out = tmp_path / "diffusion.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "diffusion.py"), "--realistic", "--smoke",
                    "--family", "flux", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=900, cwd=ROOT)
    report = json.loads(out.read_text())
    s = report["settings"]
    assert s["smoke"] and s["model"].startswith("flux-shaped") and s["resolution"] == 64
    assert s["parameters"]["transformer"] > 0 and s["parameters"]["text_encoder_2"] > 0
    assert report["checks"]["max_abs_diff_bare_vs_backbone_images"] == 0
    assert all(report["phases"][p]["samples_per_s"] > 0 for p in ("bare", "backbone", "backbone_decoder", "labeled"))


@pytest.mark.slow
def test_generate_benchmark_quick_run_pairs_builds_with_bare_loops_on_the_diffusion_path(tmp_path):
    """`generate.py --quick` with the diffusion path's overrides: the bare loop (each seed given its
    build prompt), the build on a local Ray cluster of its own, a round's ratios paired and reported,
    and an opt-in speed-up (`--variants`) timed against the eager loop."""
    out = tmp_path / "generate.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "generate.py"), "--quick", "--storage", "local",
                    "--actors", "1", "--variants", "channels_last", "--out", str(out),
                    "backbone.kind=diffusion", "decoder.kind=perception",
                    "backbone.weights=pkg://toy_diffusion", "backbone.diffusion.resolution=32"],
                   check=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = json.loads(out.read_text())
    assert report["settings"]["backbone"]["kind"] == "diffusion" and report["settings"]["repeats"] == 1
    (only,) = report["rounds"]
    (build,) = only["builds"]
    assert build["samples"] == report["bare_loop"]["samples"] == 48 and build["bytes"] > 0
    assert only["ratios"]["full_1_actors_over_bare"] == pytest.approx(build["samples_per_s"] / only["bare_samples_per_s"])
    assert 0 < build["outside_shards_s"] < build["wall_s"]
    assert report["ratios"] == only["ratios"] and list(report["goals_met"]) == ["full_1_actors_over_bare >= 0.9"]
    (variant,) = report["bare_loop"]["variants"].values()  # timed against the eager loop on the same seeds
    assert list(report["bare_loop"]["variants"]) == ["channels_last"]
    assert variant["samples_per_s"] > 0 and variant["over_eager"] == pytest.approx(
        variant["samples_per_s"] / variant["eager_samples_per_s"])
    assert variant["max_abs_image_diff_vs_eager"] <= 255


def test_generate_benchmark_pairs_each_round_with_its_own_ceiling():
    """A round's ceiling (N bare loops at once, run in that round) is reported beside the N-actor
    build's scaling, and the share of the ceiling it reached is the quotient of the two."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from generate import round_ratios
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    loop = {"samples_per_s": 100.0}
    builds = [{"num_actors": 1, "samples_per_s": 95.0, "in_shards_samples_per_actor_s": 105.0},
              {"num_actors": 2, "samples_per_s": 152.0, "in_shards_samples_per_actor_s": 90.0}]
    ratios = round_ratios(loop, builds, {"processes": 2, "over_one": 1.9})
    assert ratios["full_1_actors_over_bare"] == pytest.approx(0.95)
    assert ratios["2_actors_over_1"] == pytest.approx(152 / 95)
    assert ratios["in_shards_2_actors_over_1"] == pytest.approx(2 * 90 / 105)  # both actors' shard throughput
    assert ratios["2_bare_processes_over_1"] == 1.9
    assert ratios["2_actors_over_1_of_ceiling"] == pytest.approx(152 / 95 / 1.9)
    assert "2_actors_over_1_of_ceiling" not in round_ratios(loop, builds)  # no ceiling measured
    assert "2_actors_over_1_of_ceiling" not in round_ratios(loop, builds[1:], {"processes": 2, "over_one": 1.9})
