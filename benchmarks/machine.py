"""What the benchmarks share: what else the machine did during a measurement, the code revision, and
where the results go. They run as scripts (`python benchmarks/X.py` puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess


def busy_cpu_seconds() -> float | None:
    """Machine-wide non-idle CPU time so far (Linux /proc/stat), to tell whether others competed."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def git_revision() -> str | None:
    """HEAD of the checkout the benchmark runs from, "-dirty" when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def write_results(report: dict, out: str) -> None:
    """The benchmark's JSON, its folder created if needed; says where it went (and the run's wall time)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    took = f" ({report['wall_s']:.0f} s in all)" if isinstance(report.get("wall_s"), (int, float)) else ""
    print(f"wrote {out}{took}")
