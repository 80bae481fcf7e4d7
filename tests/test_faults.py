"""The fault-injection benchmark's --quick mode (one trial per fault) runs end to end and every trial
recovers: the reference's bytes, no data lost, no duplicates, no debris, the race promise kept."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.integration
def test_faults_quick_run_recovers_every_trial(tmp_path):
    out = tmp_path / "faults.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "faults.py"), "--quick", "--skip-bad-input",
                          "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert len(report["faults"]) == 5
    for fault, trials in report["faults"].items():
        for trial in trials:
            assert trial["recovered"] and trial["missing"] == 0 and trial["duplicates"] == 0, (fault, trial)
            assert trial["samples"] == trial["expected"] == report["samples"]
