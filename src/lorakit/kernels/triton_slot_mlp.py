"""Triton kernel for a serving pool's gated MLP over a prefill's rows (GPU only): the gate and up
projections' adapter expands, the SiLU gate and the down projection's adapter shrink in one pass.

    g' = g + h_g B_g[s]ᵀ     u' = u + h_u B_u[s]ᵀ     a = silu(g') ⊙ u'     h_d = a A_d[s]ᵀ

    g, u: (N, F) the base GEMMs' outputs x W_gᵀ, x W_uᵀ     h: (N, r_g + r_u) = x [A_g; A_u][s]ᵀ
    B_g: (S, F, r_g)   B_u: (S, F, r_u)   A_d: (S, r_d, F)   a: (N, F)   h_d: (N, r_d) float32

Token n lies in row n // T, whose slot s is ``row_slots[n // T]`` (a prefill's rows, each one
request's adapter; slot 0's factors are zeros). Run apart, a prefill's MLP makes more passes over
its (N, F) activations than it computes: the gate's and the up's adapter products each written,
then read back by their base GEMMs (beta = 1); the activation and the product two elementwise
passes (silu(g) written, then read with u); the down projection's shrink another read of a. This
kernel reads g and u once and writes a once: each program takes BM tokens of one row (one slot)
and walks F in BN-wide tiles, adding the rank-r expands (``tl.dot`` with K = r, the slot's B tile
read from L2) before the gate, and accumulating a's tile times A_d's into h_d in registers. a is
rounded to its dtype before that product, as the down projection's GEMMs read it.

Used for CUDA tensors of one kernel dtype when Triton is importable (``available``); elsewhere
``kernels/slot_mlp.py`` leaves the MLP to its layers. The CPU tests run the kernel in Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from .triton_support import on_gpu_in_kernel_dtype, tl, triton

BLOCK_M = 64  # tokens per program (of one row)
BLOCK_N = 64  # F per iteration
NUM_WARPS = 4


def available(*tensors: torch.Tensor) -> bool:
    """True when the kernel runs for these tensors: Triton importable, CUDA tensors of one kernel
    dtype, outside torch.compile."""
    return (
        all(on_gpu_in_kernel_dtype(t) for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and not torch.compiler.is_compiling()
    )


if triton is not None:

    @triton.jit
    def _gate_product_kernel(
        G, U, H, BG, BU, AD, ROW_SLOTS, ACT, HD,
        T, F, RG, RU, RD, stride_h, stride_slots,
        BM: tl.constexpr, BN: tl.constexpr, BRG: tl.constexpr, BRU: tl.constexpr, BRD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        blocks_per_row = tl.cdiv(T, BM)
        program = tl.program_id(0)
        row = program // blocks_per_row
        t = (program % blocks_per_row) * BM + tl.arange(0, BM)
        t_mask = t < T
        n = row.to(tl.int64) * T + t
        slot = tl.load(ROW_SLOTS + row * stride_slots).to(tl.int64)
        rg, ru, rd = tl.arange(0, BRG), tl.arange(0, BRU), tl.arange(0, BRD)
        # The rows' rank-r shrinks: (BM, r) each, ranks padded to a power of two >= 16 with zeros.
        h_rows = H + n[:, None] * stride_h
        hg = tl.load(h_rows + rg[None, :], mask=t_mask[:, None] & (rg[None, :] < RG), other=0.0)
        hu = tl.load(h_rows + RG + ru[None, :], mask=t_mask[:, None] & (ru[None, :] < RU), other=0.0)
        hd = tl.zeros((BM, BRD), dtype=tl.float32)
        bg_slot, bu_slot, ad_slot = BG + slot * F * RG, BU + slot * F * RU, AD + slot * RD * F
        rg_mask, ru_mask, rd_mask = rg < RG, ru < RU, rd < RD
        for start in range(0, F, BN):
            cols = start + tl.arange(0, BN)
            c_mask = cols < F
            mask = t_mask[:, None] & c_mask[None, :]
            offsets = n[:, None] * F + cols[None, :]
            g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
            # B's tile transposed, (r, BN): B[s] is (F, r) row-major, so the tile is one span.
            bg = tl.load(bg_slot + cols[None, :] * RG + rg[:, None], mask=c_mask[None, :] & rg_mask[:, None], other=0.0)
            bu = tl.load(bu_slot + cols[None, :] * RU + ru[:, None], mask=c_mask[None, :] & ru_mask[:, None], other=0.0)
            g += tl.dot(hg, bg, input_precision=PRECISION)
            u += tl.dot(hu, bu, input_precision=PRECISION)
            a = (g * tl.sigmoid(g) * u).to(ACT.dtype.element_ty)  # masked entries: 0
            tl.store(ACT + offsets, a, mask=mask)
            ad = tl.load(ad_slot + rd[None, :] * F + cols[:, None], mask=c_mask[:, None] & rd_mask[None, :], other=0.0)
            hd += tl.dot(a, ad, input_precision=PRECISION)
        tl.store(HD + n[:, None] * RD + rd[None, :], hd, mask=t_mask[:, None] & rd_mask[None, :])


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot's K and N are 16 at least


def gate_product(
    g: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    B_gate: torch.Tensor,
    B_up: torch.Tensor,
    A_down: torch.Tensor,
    row_slots: torch.Tensor,
    tokens_per_row: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (N, F) in g's dtype, h_d (N, r_d) float32) for the formula in the module docstring.

    g, u: (N, F) contiguous; h: (N, r_g + r_u) with unit last stride (gate's ranks first);
    B_gate (S, F, r_g), B_up (S, F, r_u), A_down (S, r_d, F) contiguous, g's dtype; row_slots
    (N / tokens_per_row,) integers on g's device, any stride (a plan's every T-th token slot)."""
    tokens, F = g.shape
    r_g, r_u, r_d = B_gate.shape[2], B_up.shape[2], A_down.shape[1]
    if tokens % tokens_per_row or row_slots.shape[0] != tokens // tokens_per_row:
        raise ValueError(f"{tokens} tokens are not {row_slots.shape[0]} rows of {tokens_per_row}")
    if h.shape != (tokens, r_g + r_u) or h.stride(1) != 1:
        raise ValueError(f"h must be ({tokens}, {r_g + r_u}) with a unit last stride; got {tuple(h.shape)}")
    if u.shape != g.shape or B_up.shape[1] != F or B_gate.shape[1] != F or A_down.shape[2] != F:
        raise ValueError(f"the gate's width {F} must be u's, B's rows and A_down's columns")
    if not all(t.is_contiguous() for t in (g, u, B_gate, B_up, A_down)):
        raise ValueError("g, u and the stacks must be contiguous")
    a = torch.empty_like(g)
    h_down = torch.empty(tokens, r_d, dtype=torch.float32, device=g.device)
    grid = (row_slots.shape[0] * triton.cdiv(tokens_per_row, BLOCK_M),)
    _gate_product_kernel[grid](
        g, u, h, B_gate, B_up, A_down, row_slots, a, h_down,
        tokens_per_row, F, r_g, r_u, r_d, h.stride(0), row_slots.stride(0),
        BM=BLOCK_M, BN=BLOCK_N, BRG=_rank_block(r_g), BRU=_rank_block(r_u), BRD=_rank_block(r_d),
        PRECISION="ieee" if g.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return a, h_down
