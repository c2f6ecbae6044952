"""How close the rank-r GEMMs of a LoRA step run to the memory bandwidth, per shape.

    python bench/skinny_gemm.py [--tokens 8192] [--rank 16] [--dtype bf16]

A LoRA projection adds four GEMMs with one dimension of r (16): x Aᵀ (N, r), g B (N, r),
∂A = (gB)ᵀ x (r, d_in) and ∂B = (x Aᵀ)ᵀ g (r, d_out). Each reads one large (N, d) tensor and
does almost no arithmetic per element, so its floor is that tensor's read time. This prints, for
the 1.2B Llama shapes of ``train_step.py``, each GEMM's median time (CUDA events), the bytes it must
read, and the bandwidth it reached: where it is far below the GPU's (~4.8 TB/s on an H200), a
kernel of our own could gain; where it is close, only reading less can.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from lorakit.kernels import triton_merge

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}


def median_ms(function, repeats: int = 8, calls: int = 25) -> float:
    """Median time of one call, from ``calls`` back-to-back calls between two events: a single
    call would mostly time the host's launch, not the kernel."""
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000_000)  # ~50 ms: the GPU waits while the host queues all the calls
        begin.record()
        for _ in range(calls):
            function()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])

    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    n, r, size = args.tokens, args.rank, torch.finfo(dtype).bits // 8
    print("| projection | GEMM | time | MB moved | GB/s |\n|---|---|---|---|---|")
    total = 0.0
    for name, (d_in, d_out) in SHAPES.items():
        x = torch.randn(n, d_in, device="cuda", dtype=dtype)
        g = torch.randn(n, d_out, device="cuda", dtype=dtype)
        A = torch.randn(r, d_in, device="cuda", dtype=dtype)
        B = torch.randn(d_out, r, device="cuda", dtype=dtype)
        xa, gb = x @ A.t(), g @ B
        A3 = torch.cat([A, A, A])
        W0 = torch.randn(d_out, d_in, device="cuda", dtype=dtype)
        # s g B of one projection written into a buffer for three projections' ∂A: as a row block
        # (r, N) of a (3r, N) buffer, or a column block (N, r) of an (N, 3r) buffer.
        rows, columns, empty = g.new_empty(3 * r, n), g.new_empty(n, 3 * r), g.new_empty(())
        cases = {
            "x Aᵀ": (lambda: x @ A.t(), x.numel()),
            "g B": (lambda: g @ B, g.numel()),
            "∂A = (gB)ᵀ x": (lambda: gb.t() @ x, x.numel()),
            "∂B = (xAᵀ)ᵀ g": (lambda: xa.t() @ g, g.numel()),
            "∂B as gᵀ (xAᵀ)": (lambda: g.t() @ xa, g.numel()),
            "x [A; A; A]ᵀ (3 stacked)": (lambda: x @ A3.t(), x.numel()),
            "s g B into a row block": (
                lambda: torch.addmm(empty, B.t(), g.t(), beta=0, alpha=2.0, out=rows[:r]),
                g.numel(),
            ),
            "s g B into a column block": (
                lambda: torch.addmm(empty, g, B, beta=0, alpha=2.0, out=columns[:, :r]),
                g.numel(),
            ),
            "3 ∂A from the row buffer": (lambda: rows @ x, x.numel()),
            "3 ∂A from the column buffer": (lambda: columns.t() @ x, x.numel()),
            "W0 + s B A (addmm)": (lambda: torch.addmm(W0, B, A), 2 * W0.numel()),
            "W0 + s B A (Triton)": (lambda: triton_merge.merged_weight(W0, A, B, 1.0), 2 * W0.numel()),
            "copy of x (bandwidth)": (lambda: x.clone(), 2 * x.numel()),
        }
        for label, (function, elements) in cases.items():
            ms = median_ms(function)
            read = elements * size / 1e6
            rate = f"{read / ms:.0f}"
            print(f"| {name} | {label} | {ms * 1e3:.0f} µs | {read:.0f} | {rate} |")
            if label in ("x Aᵀ", "g B", "∂A = (gB)ᵀ x", "∂B = (xAᵀ)ᵀ g"):
                total += ms
    print(f"\nfour GEMMs per projection, one of each shape: {total:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
