"""Faults survived, as numbers: builds on a local Ray cluster hit by a fault at a seeded random moment,
re-run where needed, and compared with an uninterrupted build of the same config.

    python benchmarks/faults.py                 # 3 trials per fault
    python benchmarks/faults.py --quick         # 1 trial per fault (CI: tests/test_faults.py)
    python benchmarks/faults.py --trials 10 --seed 7

Each trial checks: exactly the reference's data files, byte for byte (so N samples, no duplicate and
no missing key), no temporary debris, manifest.json present and complete, no lease left behind. The
faults measured here: the driver SIGKILLed at a random moment (then re-run); a finished shard file
truncated or corrupted after its completion record (inspect must fail naming it, the re-run must
rebuild it); two builds started into one output at once (one builds, the other is refused by the
lease or finds the build done). Also printed: the bad-input table's count (benchmarks/bad_input.py).
Results go to benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _key, _value in (("RAY_AUTH_MODE", "disabled"), ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0"),
                     ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)


def config_text(work: Path, num_samples: int) -> str:
    return (f"workdir: {work}\n"
            "decoder: {num_heads: 2}\n"
            f"generate: {{num_samples: {num_samples}, shard_size: 8, batch_size: 8, num_actors: 2, cpus_per_actor: 0.5,\n"
            "           formats: [parquet, webdataset], drop_uncertain: 0.0, lease_seconds: 20}\n")


def data_files(output: str) -> dict[str, str]:
    out = {}
    for folder in ("parquet", "webdataset"):
        d = os.path.join(output, folder)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            with open(os.path.join(d, name), "rb") as f:
                out[f"{folder}/{name}"] = hashlib.sha256(f.read()).hexdigest()
    return out


def keys(output: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(output, "parquet"), columns=["key"]).column("key").to_pylist()


def check(output: str, reference: str) -> dict:
    """The trial's result against the reference build."""
    want, got = data_files(reference), data_files(output)
    found, expected = keys(output) if got else [], keys(reference)
    debris = [str(p) for p in Path(output).rglob("*") if p.name.startswith(".tmp-") or p.name == "_lease.json"]
    manifest = Path(output, "manifest.json")
    complete = manifest.exists() and json.loads(manifest.read_text())["complete"]
    return {
        "identical": got == want,
        "samples": len(found),
        "expected": len(expected),
        "duplicates": len(found) - len(set(found)),
        "missing": len(set(expected) - set(found)),
        "debris": debris,
        "manifest_complete": bool(complete),
    }


def cli(config: Path, output: str, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "factory.cli", "--log-level", "WARNING", "generate", str(config),
                             f"generate.output={output}", f"ray.address={address}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def rerun(config: Path, output: str, address: str) -> tuple[int, str]:
    p = cli(config, output, address)
    _, err = p.communicate(timeout=600)
    return p.returncode, err.strip()


def fault_driver_killed(rng: random.Random, config: Path, output: str, address: str, shards: int) -> dict:
    """SIGKILL the driver once a random number of shards are done (0 .. all but one), then re-run."""
    stats = Path(output, "_stats")
    at = rng.randrange(0, shards)
    driver = cli(config, output, address)
    deadline = time.monotonic() + 300
    while driver.poll() is None and time.monotonic() < deadline:
        if len(list(stats.glob("shard-*.json"))) >= at and (at > 0 or Path(output, "build.json").exists()):
            break
        time.sleep(0.05)
    killed_after = len(list(stats.glob("shard-*.json")))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    start = time.perf_counter()
    code, err = rerun(config, output, address)
    return {"killed_after_shards": killed_after, "rerun_exit": code, "rerun_error": err[-300:] if code else "",
            "recovery_s": round(time.perf_counter() - start, 2)}


def fault_corrupted_shard(rng: random.Random, config: Path, output: str, address: str, shards: int,
                          reference: str) -> dict:
    """A copy of the finished reference; one random data file truncated or one byte flipped; inspect
    must fail naming it; the re-run rebuilds it."""
    shutil.copytree(reference, output)
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
    code, err = rerun(config, output, address)
    return {"file": victim, "how": how, "inspect_caught": caught, "rerun_exit": code, "rerun_error": err[-300:] if code else "",
            "recovery_s": round(time.perf_counter() - start, 2)}


def fault_two_builds(rng: random.Random, config: Path, output: str, address: str, shards: int) -> dict:
    """Two drivers started into one output at once: one builds; the other is refused by the lease (or,
    started late, finds the build done)."""
    first, second = cli(config, output, address), None
    time.sleep(rng.uniform(0, 2))
    second = cli(config, output, address)
    start = time.perf_counter()
    results = [p.communicate(timeout=600) + (p.returncode,) for p in (first, second)]
    codes = [r[2] for r in results]
    refused = sum(code == 1 and "being built by another build" in r[1] for code, r in zip(codes, results))
    ok = sorted(codes) in ([0, 0], [0, 1]) and (codes.count(1) == refused)
    if codes.count(0) == 1:  # the refused one: the dataset is the winner's; a re-run is a no-op
        codes.append(rerun(config, output, address)[0])
    return {"exit_codes": codes, "refused": refused, "promise_kept": ok,
            "recovery_s": round(time.perf_counter() - start, 2)}


def build_actors() -> list:
    """The build's Ray Data actors on this machine, found the way an operator (or the OOM killer) would:
    by their process title."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::MapWorker") and "ShardBuilder" in cmdline:
            found.append(proc)
    return found


def _kill_actors(rng: random.Random, config: Path, output: str, address: str, shards: int, kills: int) -> dict:
    """SIGKILL a random build actor `kills` times at random moments (from outside: a signal, not an
    exception in it); Ray restarts it and resubmits its shard. Re-run if the build failed anyway."""
    stats = Path(output, "_stats")
    moments = sorted(rng.randrange(0, shards) for _ in range(kills))
    driver = cli(config, output, address)
    killed, start = [], None
    for at in moments:
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline:
            if len(list(stats.glob("shard-*.json"))) >= at and build_actors():
                break
            time.sleep(0.05)
        actors = build_actors()
        if driver.poll() is not None or not actors:
            break
        victim = actors[rng.randrange(len(actors))]
        victim.send_signal(signal.SIGKILL)
        killed.append({"pid": victim.pid, "after_shards": len(list(stats.glob("shard-*.json")))})
        start = start or time.perf_counter()
        time.sleep(rng.uniform(0.5, 2.0))  # let Ray notice before the next kill
    start = start or time.perf_counter()
    _, err = driver.communicate(timeout=600)
    code, rerun_code = driver.returncode, None
    if code != 0:
        rerun_code, err = rerun(config, output, address)
    return {"killed": killed, "build_exit": code, "rerun_exit": rerun_code,
            "error": err.strip()[-300:] if (rerun_code or code and rerun_code is None) else "",
            "recovery_s": round(time.perf_counter() - start, 2)}


def fault_actor_killed_once(rng: random.Random, config: Path, output: str, address: str, shards: int) -> dict:
    return _kill_actors(rng, config, output, address, shards, kills=1)


def fault_actor_killed_repeatedly(rng: random.Random, config: Path, output: str, address: str, shards: int) -> dict:
    return _kill_actors(rng, config, output, address, shards, kills=4)


FAULTS = {
    "driver SIGKILLed at a random moment": fault_driver_killed,
    "actor SIGKILLed from outside, once": fault_actor_killed_once,
    "actor SIGKILLed from outside, 4 times": fault_actor_killed_repeatedly,
    "shard corrupted after its record": fault_corrupted_shard,
    "two builds into one output": fault_two_builds,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 trial per fault, fewer samples (CI)")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bad-input", action="store_true", help="do not run the bad-input table")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "faults.json"))
    args = parser.parse_args()
    trials, samples = (1, 48) if args.quick else (args.trials, args.samples)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ray

    from factory import config as config_lib
    from factory.config import RayConfig
    from factory.recipes.generate import generate
    from factory.runtime import init_ray

    rng = random.Random(args.seed)
    rows, report = [], {"trials": trials, "samples": samples, "seed": args.seed, "faults": {}}
    with tempfile.TemporaryDirectory(prefix="faults-") as d:
        work = Path(d)
        config = work / "factory.yaml"
        config.write_text(config_text(work, samples))
        cfg = config_lib.load_config(str(config))
        _save_untrained_decoder(cfg)
        init_ray(RayConfig(num_cpus=2))
        address = ray.get_runtime_context().gcs_address
        reference = str(work / "reference")
        cfg.generate.output = reference
        t0 = time.perf_counter()
        generate(cfg)
        report["uninterrupted_s"] = round(time.perf_counter() - t0, 2)
        shards = -(-samples // 8)
        for fault, run in FAULTS.items():
            results = []
            for t in range(trials):
                output = str(work / f"fault{list(FAULTS).index(fault)}-{t}")
                extra = {"reference": reference} if run is fault_corrupted_shard else {}
                result = run(rng, config, output, address, shards, **extra)
                result.update(check(output, reference))
                result["recovered"] = (result["identical"] and result["manifest_complete"] and not result["debris"]
                                       and result.get("inspect_caught", True) and result.get("promise_kept", True))
                results.append(result)
            report["faults"][fault] = results
            rows.append((fault, len(results), sum(r["recovered"] for r in results),
                         sum(r["missing"] for r in results), sum(r["duplicates"] for r in results),
                         max(r["recovery_s"] for r in results)))
        ray.shutdown()
        if not args.skip_bad_input:
            import bad_input

            with bad_input.loopback_s3() as (endpoint, bucket):
                outcomes = bad_input.run_all(work / "bad-input", endpoint, bucket)
            report["bad_input"] = {"tried": len(outcomes), "met_rule": sum(o.ok for o in outcomes),
                                   "failed": [{"case": o.name, "problems": o.problems} for o in outcomes if not o.ok]}
    print(f"{'fault':40s} {'trials':>6s} {'recovered':>9s} {'data lost':>9s} {'duplicates':>10s} {'recovery s (max)':>16s}")
    for fault, n, ok, lost, dups, secs in rows:
        print(f"{fault:40s} {n:6d} {ok:9d} {lost:9d} {dups:10d} {secs:16.1f}")
    print(f"uninterrupted build of {samples} samples: {report['uninterrupted_s']:.1f} s")
    if "bad_input" in report:
        print(f"bad input: {report['bad_input']['met_rule']} of {report['bad_input']['tried']} refused by the rule")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    everything = all(r[2] == r[1] and r[3] == 0 and r[4] == 0 for r in rows)
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
