"""Where the GPU waits for Python during a training step: idle time per phase of `train_step.py`'s step.

    PYTHONPATH=src python bench/gpu_gaps.py frozen lorakit-lora [--preset llama-1b]

A step is GPU-bound when the GPU always has queued work. When the host (Python queuing kernels)
falls behind, the GPU idles between kernels, and those gaps add to the wall time whatever the
kernels cost. This runs one step of each case under ``torch.profiler`` (after warm-up), takes the
GPU kernels and memory operations from the trace, and sums the gaps between them by the phase
(forward, backward, optimizer: ``train_step.py``'s ranges) in which the next kernel was launched.
The profiler slows the host a little, so gaps come out somewhat larger than without it; compare
cases with each other, not with wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import CASES, PRESETS, make_step

PHASES = ("forward", "backward", "optimizer")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", choices=list(CASES))
    parser.add_argument("--preset", choices=PRESETS, default="llama-1b")
    parser.add_argument("--gaps", type=int, default=8, help="the longest gaps to list per case")
    args = parser.parse_args(argv)
    print("| case | phase | GPU busy | GPU idle | gaps > 20 µs |\n|---|---|---|---|---|")
    listings = []
    for case in args.cases:
        step, _ = make_step(case, PRESETS[args.preset], "cuda", total_steps=5, fused=True)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        del step
        phases, gaps = idle_by_phase(prof)
        for phase in PHASES:
            busy, idle, count = phases[phase]
            print(f"| {case} | {phase} | {busy / 1e3:.1f} ms | {idle / 1e3:.2f} ms | {count} |")
        listings.append((case, sorted(gaps, reverse=True)[: args.gaps]))
    for case, longest in listings:
        print(f"\n{case}: longest gaps (µs, phase, the kernel before -> the kernel after)")
        for gap, phase, before, after in longest:
            print(f"  {gap:7.0f}  {phase:9s} {before[:50]} -> {after[:50]}")
    return 0


def idle_by_phase(prof) -> tuple[dict[str, list[float]], list[tuple[float, str, str, str]]]:
    """({phase: [busy µs, idle µs, gaps > 20 µs]}, [(gap µs, phase, kernel before, kernel after)])."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    ranges = [
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") == "user_annotation" and e.get("name") in PHASES
    ]
    launches = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    phases = {phase: [0.0, 0.0, 0] for phase in PHASES}
    gaps, previous = [], None
    for event in gpu:
        launched = launches.get(event.get("args", {}).get("correlation"), event["ts"])
        phase = next((name for start, end, name in ranges if start <= launched <= end), None)
        if phase is None:
            continue
        phases[phase][0] += event["dur"]
        if previous is not None:
            gap = max(0.0, event["ts"] - (previous["ts"] + previous["dur"]))
            phases[phase][1] += gap
            if gap > 20:
                phases[phase][2] += 1
                gaps.append((gap, phase, previous["name"], event["name"]))
        previous = event
    return phases, gaps


if __name__ == "__main__":
    sys.exit(main())
