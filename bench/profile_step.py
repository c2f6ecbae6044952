"""Where a training step's time goes: the top kernels of one or more `train_step.py` cases.

    python bench/profile_step.py frozen lorakit-lora [--preset llama-1b]

Runs the same step as ``bench/train_step.py`` under ``torch.profiler`` (warm-up first) and prints,
for every case after the first, the kernels (CPU ops on a CPU-only machine) whose own time differs
most from the first case's: the way to see what a LoRA step adds on top of the frozen base.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import CASES, PRESETS, make_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", choices=list(CASES))
    parser.add_argument("--preset", choices=PRESETS, default=None)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset or ("llama-1b" if device == "cuda" else "smollm2-135m")]
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    totals = {}
    for case in args.cases:
        step, _ = make_step(case, preset, device, total_steps=4, fused=True)  # the benchmark's own step
        for _ in range(3):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[activity]) as prof:
            step()
            if device == "cuda":
                torch.cuda.synchronize()
        totals[case] = kernel_times(prof, device)
        del step
    first, *others = args.cases
    for case in others:
        diff = {
            k: totals[case].get(k, (0, 0))[0] - totals[first].get(k, (0, 0))[0] for k in {*totals[case], *totals[first]}
        }
        print(
            f"===== {case} vs {first}: {sum(t for t, _ in totals[case].values()) / 1e3:.1f} ms vs "
            f"{sum(t for t, _ in totals[first].values()) / 1e3:.1f} ms of kernel time"
        )
        for name in sorted(diff, key=lambda k: -abs(diff[k]))[: args.rows]:
            calls = totals[case].get(name, (0, 0))[1] - totals[first].get(name, (0, 0))[1]
            print(f"  {diff[name] / 1e3:+8.2f} ms  {calls:+5d} calls  {name[:110]}")
    return 0


def kernel_times(prof, device: str) -> dict[str, tuple[float, int]]:
    """Kernel (or op) name -> (own time in µs, calls)."""
    result = {}
    for event in prof.key_averages():
        own = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if own > 0:
            result[event.key] = (own, event.count)
    return result


if __name__ == "__main__":
    sys.exit(main())
