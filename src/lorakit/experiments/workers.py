"""Several devices: one worker process per device, each pulling runs from the sweep folder.

``--devices 0,1`` starts a worker on each GPU (``CUDA_VISIBLE_DEVICES`` set to it, so everything in
that process sees one GPU); ``--devices cpu,cpu`` two CPU workers, the cores shared between them
(each gets ``cpu_count / workers`` torch threads). Workers coordinate only through the folder (run
claims; the Optuna storage for a search), so workers on other machines that share the folder, or
the search's storage, join the same sweep: start ``lorakit sweep`` there with the same config and
``--out``. A worker's own run bars would garble each other in one terminal: the parent shows the
sweep's bar and a line per finished run instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError


def parse_devices(devices: str | list[str] | None) -> list[str]:
    """``"0,1"`` / ``["cpu", "cpu"]`` -> ``["0", "1"]`` / ``["cpu", "cpu"]``; [] when not given."""
    if devices is None:
        return []
    items = devices.split(",") if isinstance(devices, str) else [str(d) for d in devices]
    items = [d.strip() for d in items if d.strip()]
    for item in items:
        if not (item.isdigit() or item in ("cpu", "cuda", "mps") or item.startswith("cuda:")):
            raise ConfigError(f"--devices: {item!r} is not a device; give GPU numbers (0,1) or cpu, cuda:N")
    return items


def worker_environment(device: str, workers: int) -> tuple[dict[str, str], str]:
    """(environment, the device train() is given) of the worker for ``device``."""
    env = dict(os.environ)
    if device.isdigit():
        env["CUDA_VISIBLE_DEVICES"] = device
        return env, "cuda"
    if device == "cpu":
        env["LORAKIT_SWEEP_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env, device


def start_workers(folder: Path, devices: list[str], verbose: bool = False) -> list[tuple[str, subprocess.Popen]]:
    """One ``python -m lorakit.experiments.worker`` per device; they read the sweep from ``folder``."""
    started = []
    for device in devices:
        env, train_device = worker_environment(device, len(devices))
        command = [sys.executable, "-m", "lorakit.experiments.worker", str(folder), "--device", train_device]
        if verbose:
            command.append("--verbose")
        started.append((device, subprocess.Popen(command, env=env)))
    return started
