"""What a sweep measures around each run: its peak memory, wall time, and the size of what it saved.

Peak memory, per run even when runs share a process: on a GPU ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` (every tensor torch allocated there, activations included); on a
Linux CPU the process's peak resident set (``VmHWM``), reset before the run through
``/proc/self/clear_refs`` — the whole process (Python, libraries, the loaded model), so compare runs
with each other, not with the tensors' sizes. Elsewhere the process's peak since it started
(``ru_maxrss``), which an earlier, larger run in the same process would hide: the label says which.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


class RunMeter:
    """Wall time and peak memory of the code run inside ``with RunMeter(device) as meter:``."""

    def __init__(self, device: str | None) -> None:
        from ..models.device import parse_device, resolve_device

        self.device = parse_device(resolve_device(device))
        self.wall_s = 0.0
        self.peak_bytes: int | None = None
        self.peak_label = ""
        self._reset = False

    def __enter__(self) -> "RunMeter":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset = _reset_peak_rss()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._started
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak_label = f"torch.cuda.max_memory_allocated on {self.device}"
        elif self._reset and (hwm := _peak_rss()) is not None:
            self.peak_bytes, self.peak_label = hwm, "peak RSS of the run (VmHWM, reset before it)"
        else:
            from ..memory import measured_peak

            self.peak_bytes, label = measured_peak("cpu")
            self.peak_label = label + " since the process started"


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def folder_bytes(path: Path | None) -> int | None:
    """Bytes of the files in ``path`` (a file or a folder); None when nothing was saved."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(os.path.getsize(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
