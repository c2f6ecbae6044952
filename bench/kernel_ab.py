"""A/B of lorakit's kernel choices in one process, with each step's host time beside its wall time.

    PYTHONPATH=src python bench/kernel_ab.py frozen,lora,dora,dora-no-triton [--preset llama-1b]

Runs ``train_step.py``'s step for each variant, one after the other, and prints the median wall
time, the ratio to the first variant and the median host time: how long Python took to queue
the step's work (``step()`` returning, before the GPU sync). When host time is close to wall time
the step is host-bound and fewer launches matter more than faster kernels; the same code has
measured host-bound on one lent H200 and GPU-bound on another (docs/benchmarks.md).
A variant is a train_step case plus module attributes set for its run (restored after).
``--interleave`` builds every variant first and runs one step of each in turn, which is what
makes differences of a few ms readable (order and drift effects reach 20 ms otherwise).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch
from train_step import PRESETS, make_step

from lorakit.kernels import dora_linear, dora_norm, triton_swiglu, tuning
from lorakit.patching import attention_siblings, gated_mlp

# Gated MLPs run layer by layer (the fused MLP function declines every call).
LAYERWISE_MLP = [(gated_mlp, "fused_mlp_forward", lambda mlp, x: None)]
# q, k, v as three separate calls (the shared call declines every time).
SEPARATE_QKV = [(attention_siblings.SiblingProjections, "output", lambda self, layer, x: None)]
# The fused MLP's SiLU gate in torch ops instead of the Triton kernels.
TORCH_GATE = [(triton_swiglu, "available", lambda g, u: False)]

# Diagnostics (wrong results, timing only): what DoRA's per-step parts cost. Each weight's first c
# reused instead of the factored norm every step; no ∂m (zeros) instead of its product and sums.
_FIRST_RESCALE: dict[int, torch.Tensor] = {}


def _rescale_once(weight, A, B, scaling, magnitude):
    if id(weight) not in _FIRST_RESCALE:
        _FIRST_RESCALE[id(weight)] = dora_norm.factored_rescale(weight, A, B, scaling, magnitude)
    return _FIRST_RESCALE[id(weight)]


NORM_ONCE = [(dora_linear, "factored_rescale", _rescale_once)]
NO_MAGNITUDE_GRAD = [(dora_linear, "magnitude_grad", lambda g, out, bias, m: (torch.zeros_like(m), None))]

VARIANTS = {
    "frozen": ("frozen", []),
    "lora": ("lorakit-lora", []),
    "lora-fp32": ("lorakit-lora-fp32", []),
    "lora-triton-merge": ("lorakit-lora", [(tuning, "TRITON_MERGE", "1")]),
    "lora-separate-qkv": ("lorakit-lora", SEPARATE_QKV),
    "lora-unstacked": ("lorakit-lora", [(tuning, "STACK_PROJECTIONS", False)]),
    "lora-rebuild-merged": ("lorakit-lora", [(tuning, "KEEP_MERGED", False)]),
    "lora-never-merge": ("lorakit-lora", [(tuning, "MERGE_RATIO", float("inf"))]),
    "lora-always-merge": ("lorakit-lora", [(tuning, "MERGE_RATIO", 0.0)]),
    "lora-reference": ("lorakit-lora-reference", []),
    "lora-layerwise-mlp": ("lorakit-lora", LAYERWISE_MLP),
    "lora-torch-gate": ("lorakit-lora", TORCH_GATE),
    "dora": ("lorakit-dora", []),
    "dora-rebuild-merged": ("lorakit-dora", [(tuning, "KEEP_MERGED", False)]),
    "dora-separate-qkv": ("lorakit-dora", SEPARATE_QKV),
    "dora-unstacked": ("lorakit-dora", [(tuning, "STACK_PROJECTIONS", False)]),
    "dora-layerwise-mlp": ("lorakit-dora", LAYERWISE_MLP),
    "dora-torch-gate": ("lorakit-dora", TORCH_GATE),
    "dora-never-merge": ("lorakit-dora", [(tuning, "MERGE_RATIO", float("inf"))]),
    "dora-always-merge": ("lorakit-dora", [(tuning, "MERGE_RATIO", 0.0)]),
    "dora-no-triton": ("lorakit-dora", [(tuning, "TRITON_MERGE", "0"), (tuning, "TRITON_COLSUM", False)]),
    "dora-torch-dm": ("lorakit-dora", [(tuning, "TRITON_COLSUM", False)]),
    "dora-torch-builds": ("lorakit-dora", [(tuning, "TRITON_MERGE", "0")]),
    "dora-reference": ("lorakit-dora-reference", []),
    "dora-norm-once": ("lorakit-dora", NORM_ONCE),
    "dora-no-dm": ("lorakit-dora", NO_MAGNITUDE_GRAD),
    "dora-norm-once-no-dm": ("lorakit-dora", NORM_ONCE + NO_MAGNITUDE_GRAD),
}


class patched:
    """Context manager: set module attributes for a variant, restore them on exit."""

    def __init__(self, patches):
        self.patches = patches

    def __enter__(self):
        self.saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self.patches]
        for obj, name, value in self.patches:
            setattr(obj, name, value)

    def __exit__(self, *exc):
        for obj, name, value in self.saved:
            setattr(obj, name, value)


# Seconds of GPU sleep queued before each step (``--head-start``): the host then queues the step
# while the GPU sleeps, so the step's own GPU time (CUDA events around it) has no idle gaps where
# the GPU waited for Python. Wall time minus that GPU time is what a faster host could recover.
HEAD_START_S = 0.0


def timed(step, device: str) -> tuple[float, float]:
    """(wall s, host s) of one step: host is the time until ``step()`` returns, before the sync.
    With a head start, "wall" is the GPU time between events around the step (see HEAD_START_S)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda" and HEAD_START_S > 0:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(HEAD_START_S * _cycles_per_second()))
        begin.record()
        start = time.perf_counter()
        step()
        queued = time.perf_counter()
        end.record()
        sync()
        return begin.elapsed_time(end) / 1e3, queued - start
    start = time.perf_counter()
    step()
    queued = time.perf_counter()
    sync()
    return time.perf_counter() - start, queued - start


def _cycles_per_second(cache={}) -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per second, measured once."""
    if "rate" not in cache:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(10_000_000)  # warm-up
        begin.record()
        torch.cuda._sleep(100_000_000)
        end.record()
        torch.cuda.synchronize()
        cache["rate"] = 100_000_000 / (begin.elapsed_time(end) / 1e3)
    return cache["rate"]


def measure(case: str, patches, preset: dict, device: str, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median wall s, median host s, peak GiB or nan) of ``case`` with ``patches`` applied."""
    with patched(patches):
        step, _ = make_step(case, preset, device, warmup + steps, fused=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        samples = [timed(step, device) for _ in range(warmup + steps)][warmup:]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del step
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(w for w, _ in samples), statistics.median(h for _, h in samples), peak


def measure_interleaved(names: list[str], preset: dict, device: str, warmup: int, steps: int):
    """All variants' models at once, one step of each in turn (patches around each step), so a
    drift of the machine hits every variant alike. Rows of (median wall s, median host s, nan,
    median per-round ratio to the first variant, best wall s)."""
    steps_of = []
    for name in names:
        case, patches = VARIANTS[name]
        with patched(patches):
            steps_of.append(make_step(case, preset, device, warmup + steps, fused=True)[0])
    samples = [[] for _ in names]
    for i in range(warmup + steps):
        for name, step, record in zip(names, steps_of, samples):
            with patched(VARIANTS[name][1]):
                sample = timed(step, device)
            if i >= warmup:
                record.append(sample)
    # Per round: each variant's wall time over the first variant's in the same round (the median
    # of these is the figure least moved by a machine whose speed drifts over seconds).
    rounds = [statistics.median(w / f for (w, _), (f, _) in zip(r, samples[0])) for r in samples]
    # The best step is the other figure a shared machine cannot inflate: its neighbours and CPU
    # steal only ever add time, so the fastest of many steps is the closest to the code's own cost.
    return [
        (
            statistics.median(w for w, _ in r),
            statistics.median(h for _, h in r),
            float("nan"),
            per_round,
            min(w for w, _ in r),
        )
        for r, per_round in zip(samples, rounds)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--preset", choices=PRESETS, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="build every variant first, then run one step of each in turn (no peak memory)",
    )
    parser.add_argument(
        "--head-start",
        type=float,
        default=0.0,
        metavar="MS",
        help="queue MS of GPU sleep before each step and time the step's GPU work alone",
    )
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset or ("llama-1b" if device == "cuda" else "smollm2-135m")]
    global HEAD_START_S
    HEAD_START_S = args.head_start / 1e3
    if args.interleave:
        results = measure_interleaved(names, preset, device, args.warmup, args.steps)
    else:
        results = [measure(*VARIANTS[name], preset, device, args.warmup, args.steps) for name in names]
    rows = [(name, *result) for name, result in zip(names, results)]
    first = rows[0][1]
    best_first = rows[0][5] if args.interleave else None
    print(
        "| variant | wall | × first | × first, per round | best, × first | host | peak memory |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name, wall, host, peak, *interleaved in rows:
        memory = "—" if peak != peak else f"{peak:.1f} GiB"  # nan: not measured (interleaved, CPU)
        paired, best = (
            (f"{interleaved[0]:.3f}", f"{interleaved[1] * 1e3:.1f} ms, {interleaved[1] / best_first:.3f}")
            if interleaved
            else ("—", "—")
        )  # interleaved runs only
        print(
            f"| {name} | {wall * 1e3:.1f} ms | {wall / first:.3f} | {paired} | {best} | "
            f"{host * 1e3:.1f} ms | {memory} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
