"""What a benchmark ran on, in one line (no third-party imports, so every benchmark can use it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """CPU model and the cores this process may use."""
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"
