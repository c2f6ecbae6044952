"""What each GEMM of a mixed-adapter prefill costs against the base GEMM it rides on (GPU).

    python bench/prefill_parts.py [--rows 32] [--tokens 512] [--adapters 8] [--rank 16]

A prefill of R rows × T tokens, each row one of the adapters' slots, adds to each projection's
base GEMM (x Wᵀ, compute-bound at these sizes) a shrink h = x A[s]ᵀ (reads x) and an expand
B[s] h into the output (writes or reads and writes it): bandwidth-bound GEMMs with a dimension of
r. This prints, for the 1.2B Llama projections, each part's median time (CUDA events,
``skinny_gemm.median_ms``) and the bandwidth it reached, and the alternatives the code could take:
the base GEMM accumulating onto the output (beta = 1, ``multi_lora.lora_then_base``), the shrink as
one plain GEMM over every adapter's A (N, 128 columns) or over q, k and v's A stacked. Then the
gated MLP's activation over (N, 8192): torch's silu and product, the SiLU-gate kernel alone
(``triton_swiglu``), and the serving pool's fused pass (``triton_slot_mlp.gate_product``: the gate's
and the up's expands, the gate, the down projection's shrink) at several tile sizes.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from skinny_gemm import median_ms

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    dtype, size = torch.bfloat16, 2
    R, T, S, r = args.rows, args.tokens, args.adapters, args.rank
    n = R * T
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {R}x{T} tokens, {S} adapters, r{r}, bf16")
    print("| projection | part | time | MB moved | GB/s |\n|---|---|---|---|---|")
    row_slots = torch.arange(R, device="cuda") % S
    for name, (d_in, d_out) in SHAPES.items():
        x = torch.randn(n, d_in, device="cuda", dtype=dtype)
        W = torch.randn(d_out, d_in, device="cuda", dtype=dtype) * 0.02
        A = torch.randn(S, r, d_in, device="cuda", dtype=dtype)
        B = torch.randn(S, d_out, r, device="cuda", dtype=dtype)
        out = torch.randn(n, d_out, device="cuda", dtype=dtype)
        A_r, B_r = A.index_select(0, row_slots), B.index_select(0, row_slots)
        A_all = A.reshape(S * r, d_in)
        A_qkv = torch.cat([A_r, A_r, A_r], dim=1)  # (R, 3r, d_in): three projections' A stacked
        x3, out3 = x.view(R, T, d_in), out.view(R, T, d_out)
        h = torch.bmm(x3, A_r.transpose(1, 2))
        xs, outs = x.numel() * size / 1e6, out.numel() * size / 1e6
        cases = {
            "base x Wᵀ (beta 0)": (lambda: F.linear(x, W), xs + outs),
            "base x Wᵀ onto out (beta 1)": (lambda: out.addmm_(x, W.t()), xs + 2 * outs),
            "shrink: bmm over rows (R, r)": (lambda: torch.bmm(x3, A_r.transpose(1, 2)), xs),
            f"shrink: one GEMM over {S} adapters (N, {S * r})": (lambda: x @ A_all.t(), xs),
            "shrink: bmm, three A stacked (R, 3r)": (lambda: torch.bmm(x3, A_qkv.transpose(1, 2)), xs),
            "expand: bmm written (lora first)": (lambda: torch.bmm(h, B_r.transpose(1, 2)), outs),
            "expand: baddbmm_ onto out (base first)": (lambda: out3.baddbmm_(h, B_r.transpose(1, 2)), 2 * outs),
            "copy of out (bandwidth)": (lambda: out.clone(), 2 * outs),
        }
        for label, (function, megabytes) in cases.items():
            ms = median_ms(function, repeats=5, calls=10)
            print(f"| {name} | {label} | {ms * 1e3:.0f} µs | {megabytes:.0f} | {megabytes / ms:.0f} |")
    gate_product_parts(R, T, S, r, dtype)
    return 0


def gate_product_parts(R: int, T: int, S: int, r: int, dtype: torch.dtype, width: int = 8192) -> None:
    """The MLP's activation: two torch passes, one Triton pass, the fused serving pass by tiles."""
    from lorakit.kernels import triton_slot_mlp, triton_swiglu

    n, size = R * T, torch.finfo(dtype).bits // 8
    g, u = (torch.randn(n, width, device="cuda", dtype=dtype) for _ in range(2))
    h = torch.randn(n, 2 * r, device="cuda", dtype=dtype)
    B_gate, B_up = (torch.randn(S, width, r, device="cuda", dtype=dtype) * 0.02 for _ in range(2))
    A_down = torch.randn(S, r, width, device="cuda", dtype=dtype) * 0.02
    row_slots = torch.arange(R, device="cuda") % S
    moved = 3 * g.numel() * size / 1e6  # read g and u, write a
    cases = {
        "silu(g) * u (torch, two passes)": (lambda: F.silu(g) * u, 5 * g.numel() * size / 1e6),
        "silu_mul (Triton, no adapters)": (lambda: triton_swiglu.silu_mul(g, u), moved),
    }
    # tiles (tokens, columns, warps) and F's split over programs (None: the default, column_parts)
    trials = ((64, 64, 4, None), (64, 64, 4, 1), (32, 64, 4, None), (64, 128, 4, None), (64, 128, 8, None))
    trials += ((128, 64, 8, None),)
    real_parts = triton_slot_mlp.column_parts
    for block_m, block_n, warps, parts in trials:

        def fused(block_m=block_m, block_n=block_n, warps=warps, parts=parts):
            kept = triton_slot_mlp.BLOCK_M, triton_slot_mlp.BLOCK_N, triton_slot_mlp.NUM_WARPS
            triton_slot_mlp.BLOCK_M, triton_slot_mlp.BLOCK_N, triton_slot_mlp.NUM_WARPS = block_m, block_n, warps
            triton_slot_mlp.column_parts = real_parts if parts is None else (lambda *a: parts)
            try:
                return triton_slot_mlp.gate_product(g, u, h, B_gate, B_up, A_down, row_slots, T)
            finally:
                triton_slot_mlp.BLOCK_M, triton_slot_mlp.BLOCK_N, triton_slot_mlp.NUM_WARPS = kept
                triton_slot_mlp.column_parts = real_parts

        split = "auto" if parts is None else parts
        cases[f"gate_product BM{block_m} BN{block_n} w{warps} F parts {split}"] = (fused, moved)
    for label, (function, megabytes) in cases.items():
        ms = median_ms(function, repeats=5, calls=10)
        print(f"| gated MLP (N, {width}) | {label} | {ms * 1e3:.0f} µs | {megabytes:.0f} | {megabytes / ms:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
