"""What else the machine did during a measurement: shared by the benchmarks, which run as scripts
(`python benchmarks/X.py` puts this folder on sys.path)."""

from __future__ import annotations

import os


def busy_cpu_seconds() -> float | None:
    """Machine-wide non-idle CPU time so far (Linux /proc/stat), to tell whether others competed."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
