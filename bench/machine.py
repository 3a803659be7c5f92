"""The machine a benchmark ran on, for every figure: CPU model and cores (``lscpu``), the GPU if any,
and the load (``/proc/loadavg``, as ``uptime`` prints it) when it was taken."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from boxrefine.shared.runtime.fileio import atomic_write_json


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def load() -> str:
    """The 1/5/15-minute load averages."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    d = {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "torch_threads": torch.get_num_threads(),
         "load": load()}
    d["summary"] = (f"{d['cpu']}, {d['cores']} cores, {'GPU ' + gpu if gpu else 'no GPU'}, "
                    f"{d['torch_threads']} torch threads, load average {d['load']}")
    return d


def describe() -> str:
    """The machine in one line, for a bench's printed and saved figures."""
    return machine()["summary"]


def write_json(path: Path, obj: dict) -> None:
    """A bench's figures, atomically (its folder made first)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj, indent=1)
