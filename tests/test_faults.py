"""The fault-injection benchmark's CI run: --quick (32 samples, one trial) on a representative pair,
one process fault (a build actor SIGKILLed from outside) and one storage fault (the S3 endpoint down
for a few seconds mid-build); every trial recovers: the reference's bytes, no data lost, no
duplicates, no debris. `python benchmarks/faults.py --quick` runs every fault (several minutes)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = ["actor-once", "s3-down"]


@pytest.mark.slow
@pytest.mark.integration
def test_faults_quick_run_recovers_every_trial(tmp_path):
    out = tmp_path / "faults.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "faults.py"), "--quick", "--skip-bad-input",
                          "--faults", ",".join(FAULTS), "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["faults"]) == FAULTS
    for fault, trials in report["faults"].items():
        assert len(trials) == 1
        for trial in trials:
            assert trial["recovered"] and trial["missing"] == 0 and trial["duplicates"] == 0, (fault, trial)
            assert trial["samples"] == trial["expected"] == report["samples"] and not trial["debris"]
            assert trial["identical"] and trial["manifest_complete"]
    assert report["faults"]["actor-once"][0]["killed"], "no actor was killed"


def test_an_unknown_fault_is_refused_naming_it():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "faults.py"), "--faults", "driver,disk-ful"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "disk-ful" in run.stderr and "disk-full" in run.stderr
