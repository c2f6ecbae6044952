"""Where a training step's host time goes: Python's profiler over a few `train_step.py` steps.

    PYTHONPATH=src python bench/host_profile.py lorakit-dora [--preset llama-1b] [--steps 3]

On a GPU a step whose host time (Python queuing the work) reaches its wall time is host-bound
(``kernel_ab.py`` prints both). This lists the functions and torch operators that take that host
time, by their own time (cProfile's ``tottime``), so the cost per call of each piece is visible.
The GPU is synchronised after each step only, as in training.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

import torch
from train_step import CASES, PRESETS, make_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=list(CASES))
    parser.add_argument("--preset", choices=PRESETS, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset or ("llama-1b" if device == "cuda" else "smollm2-135m")]
    step, _ = make_step(args.case, preset, device, args.steps + 2, fused=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: kernel compilation, allocator, caches
        step()
    sync()
    profiler = cProfile.Profile()
    for _ in range(args.steps):
        profiler.enable()
        step()
        profiler.disable()
        sync()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
