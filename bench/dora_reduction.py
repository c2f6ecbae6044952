"""Micro-benchmark: ways to compute DoRA's magnitude gradient sum_t g[t, j] * out[t, j] on one device.

    python bench/dora_reduction.py [--tokens 8192 --width 8192]

Prints the median time of each formulation (bf16 inputs, fp32 result) and its difference from a
float64 reference; the fused DoRA path uses the fastest accurate one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

WAYS = {
    "mul+sum": lambda g, o: (g * o).sum(0, dtype=torch.float32),
    "einsum": lambda g, o: torch.einsum("nd,nd->d", g, o).float(),
    "bmm": lambda g, o: torch.bmm(g.t().unsqueeze(1), o.t().unsqueeze(2)).view(-1).float(),
    "vecdot": lambda g, o: torch.linalg.vecdot(g, o, dim=0).float(),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--width", type=int, default=8192)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g, o = (torch.randn(args.tokens, args.width, device=device, dtype=torch.bfloat16) for _ in range(2))
    exact = (g.double() * o.double()).sum(0)
    for name, way in WAYS.items():
        times = []
        for i in range(13):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = way(g, o)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
        error = ((result.double() - exact).abs().max() / exact.abs().max()).item()
        print(f"{name:8s} {statistics.median(times) * 1e3:8.3f} ms   max relative error {error:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
