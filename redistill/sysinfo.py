"""What machine a result was measured on, for the command-and-machine line of every results file."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line: cores, CPU, OS and architecture, GPU (if torch sees one), Python."""
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return (f"{os.cpu_count()} cores ({cpu_model()}), {platform.system()} {platform.machine()}, {gpu}, "
            f"Python {platform.python_version()}")
