"""Triton kernels for a serving pool's gated MLP (GPU only): the gate and up projections' adapter
expands, the SiLU gate and the down projection's adapter shrink in one pass.

    g' = g + h_g B_g[s]ᵀ     u' = u + h_u B_u[s]ᵀ     a = silu(g') ⊙ u'     h_d = a A_d[s]ᵀ

    g, u: (N, F) the base GEMMs' outputs x W_gᵀ, x W_uᵀ     h: (N, r_g + r_u) = x [A_g; A_u][s]ᵀ
    B_g: (S, F, r_g)   B_u: (S, F, r_u)   A_d: (S, r_d, F)   a: (N, F)   h_d: (N, r_d) float32

Run apart, the MLP makes more passes over its (N, F) activations than its adapters compute: the
gate's and the up's adapter products each added into g and u, the activation and the product two
elementwise passes (silu(g) written, then read with u), the down projection's shrink another read
of a. These kernels read g and u once and write a once, adding the rank-r expands before the gate
and accumulating a's share of h_d as a is written. a is rounded to its dtype before that product,
as the down projection's GEMMs read it. Two forms:

- ``gate_product`` (a prefill's rows): token n lies in row n // T, whose slot is
  ``row_slots[n // T]``; program (i, j) takes BM tokens of one row (one slot) and walks its share
  j of F in BN-wide tiles (F split so that the programs fill the GPU a few times over), the
  expands and the shrink as ``tl.dot``s (K = r), its part of h_d accumulated in registers and
  written to plane j, the planes then added.
- ``gate_product_tokens`` (decode batches, BGMV's regime: each token its own slot): program
  (n, j) takes token n's columns j·C … (j+1)·C - 1, the rank-r sums as reductions, h taken as the
  shrink's planes (``triton_bgmv.shrink_planes``) and h_d written as planes of partial sums that
  the down projection's expand adds up (``triton_bgmv.expand_planes``). In a CUDA graph, where each
  launch is a node, the MLP's adapters then cost three launches where they cost six.

Slot 0's factors are zeros (rows without an adapter: a = silu(g) ⊙ u). Used for CUDA tensors of one
kernel dtype when Triton is importable (``available``); elsewhere ``kernels/slot_mlp.py`` leaves
the MLP to its layers. The CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from .triton_bgmv import programs_per_token
from .triton_support import on_gpu_in_kernel_dtype, rank_block, split_evenly, tl, triton

BLOCK_M = 64  # tokens per program (of one row)
BLOCK_N = 64  # F per iteration
NUM_WARPS = 4
TOKEN_BLOCK_N = 128  # F per iteration of a decode token's program
MAX_RANK = 64
"""The largest rank the kernels take: their rank tiles are whole (a power of two >= 16), and above
64 the rows kernel's tiles outgrow an H100's shared memory in fp32 (compiled for sm_90: 147 KB at
64, 279 KB at 128 of 227 KB). Larger ranks keep the layers one by one."""


def available(*tensors: torch.Tensor) -> bool:
    """True when the kernel runs for these tensors: Triton importable, CUDA tensors of one kernel
    dtype, outside torch.compile."""
    return (
        all(on_gpu_in_kernel_dtype(t) for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and not torch.compiler.is_compiling()
    )


def takes_ranks(A_stacks: list[torch.Tensor]) -> bool:
    """True when every A stack's rank (S, r, d_in) is at most ``MAX_RANK``."""
    return all(A.shape[1] <= MAX_RANK for A in A_stacks)


if triton is not None:

    @triton.jit
    def _gate_product_kernel(
        G, U, H, BG, BU, AD, ROW_SLOTS, ACT, HD,
        T, F, RG, RU, RD, stride_h, stride_slots, stride_hds, cols_per_program,
        BM: tl.constexpr, BN: tl.constexpr, BRG: tl.constexpr, BRU: tl.constexpr, BRD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        # Program (i, j): tokens block i (of one row), columns j·C … (j+1)·C - 1 of F; its share of
        # h_d goes to plane j (the caller adds the planes).
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
        first = tl.program_id(1) * cols_per_program
        end = tl.minimum(first + cols_per_program, F)
        for start in range(first, end, BN):
            cols = start + tl.arange(0, BN)
            c_mask = cols < end
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
        hd_rows = HD + tl.program_id(1).to(tl.int64) * stride_hds + n[:, None] * RD
        tl.store(hd_rows + rd[None, :], hd, mask=t_mask[:, None] & rd_mask[None, :])

    @triton.jit
    def _token_gate_product_kernel(
        G, U, H, BG, BU, AD, SLOTS, ACT, HD,
        F, RG, RU, RD, stride_h, stride_hs, stride_hd, stride_hds, cols_per_program,
        SPLIT: tl.constexpr, BN: tl.constexpr, BRG: tl.constexpr, BRU: tl.constexpr, BRD: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0)
        part = tl.program_id(1)
        slot = tl.load(SLOTS + n).to(tl.int64)
        # Slot 0: no adapter, and the shrink wrote nothing for the token: rank 0 for its loads.
        live = (slot != 0).to(tl.int32)
        rg, ru, rd = tl.arange(0, BRG), tl.arange(0, BRU), tl.arange(0, BRD)
        rg_mask, ru_mask, rd_mask = rg < RG * live, ru < RU * live, rd < RD * live
        hg = tl.zeros((BRG,), dtype=tl.float32)
        hu = tl.zeros((BRU,), dtype=tl.float32)
        for plane in tl.static_range(SPLIT):  # the shrink's partial sums
            h_row = H + plane * stride_hs + n * stride_h
            hg += tl.load(h_row + rg, mask=rg_mask, other=0.0)
            hu += tl.load(h_row + RG + ru, mask=ru_mask, other=0.0)
        hd = tl.zeros((BRD,), dtype=tl.float32)
        start = part * cols_per_program
        end = tl.minimum(start + cols_per_program, F)
        row = n.to(tl.int64) * F
        bg_slot, bu_slot, ad_slot = BG + slot * F * RG, BU + slot * F * RU, AD + slot * RD * F
        for c0 in range(start, end, BN):
            cols = c0 + tl.arange(0, BN)
            c_mask = cols < end
            g = tl.load(G + row + cols, mask=c_mask, other=0.0).to(tl.float32)
            u = tl.load(U + row + cols, mask=c_mask, other=0.0).to(tl.float32)
            bg = tl.load(bg_slot + cols[:, None] * RG + rg[None, :], mask=c_mask[:, None] & rg_mask[None, :], other=0.0)
            bu = tl.load(bu_slot + cols[:, None] * RU + ru[None, :], mask=c_mask[:, None] & ru_mask[None, :], other=0.0)
            g += tl.sum(bg.to(tl.float32) * hg[None, :], axis=1)
            u += tl.sum(bu.to(tl.float32) * hu[None, :], axis=1)
            a = (g * tl.sigmoid(g) * u).to(ACT.dtype.element_ty)
            tl.store(ACT + row + cols, a, mask=c_mask)
            ad = tl.load(ad_slot + rd[None, :] * F + cols[:, None], mask=c_mask[:, None] & rd_mask[None, :], other=0.0)
            hd += tl.sum(ad.to(tl.float32) * a.to(tl.float32)[:, None], axis=0)
        tl.store(HD + part.to(tl.int64) * stride_hds + n * stride_hd + rd, hd, mask=rd < RD)


def _checked_sizes(g, u, B_gate, B_up, A_down) -> tuple[int, int, int, int, int]:
    """(N, F, r_g, r_u, r_d) of the kernels' operands, after checking they fit together."""
    tokens, F = g.shape
    if u.shape != g.shape or B_up.shape[1] != F or B_gate.shape[1] != F or A_down.shape[2] != F:
        raise ValueError(f"the gate's width {F} must be u's, B's rows and A_down's columns")
    if not all(t.is_contiguous() for t in (g, u, B_gate, B_up, A_down)):
        raise ValueError("g, u and the stacks must be contiguous")
    return tokens, F, B_gate.shape[2], B_up.shape[2], A_down.shape[1]


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
    tokens, F, r_g, r_u, r_d = _checked_sizes(g, u, B_gate, B_up, A_down)
    if tokens % tokens_per_row or row_slots.shape[0] != tokens // tokens_per_row:
        raise ValueError(f"{tokens} tokens are not {row_slots.shape[0]} rows of {tokens_per_row}")
    if h.shape != (tokens, r_g + r_u) or h.stride(1) != 1:
        raise ValueError(f"h must be ({tokens}, {r_g + r_u}) with a unit last stride; got {tuple(h.shape)}")
    a = torch.empty_like(g)
    blocks = row_slots.shape[0] * triton.cdiv(tokens_per_row, BLOCK_M)
    # F split over programs as well, enough to fill the GPU about four times over: a prefill's
    # rows alone make a few hundred programs, each walking all of F.
    parts = column_parts(blocks, F, BLOCK_N, g.device)
    cols, parts = split_evenly(F, parts, BLOCK_N)
    planes = torch.empty(parts, tokens, r_d, dtype=torch.float32, device=g.device)
    _gate_product_kernel[(blocks, parts)](
        g, u, h, B_gate, B_up, A_down, row_slots, a, planes,
        tokens_per_row, F, r_g, r_u, r_d, h.stride(0), row_slots.stride(0), planes.stride(0), cols,
        BM=BLOCK_M, BN=BLOCK_N, BRG=rank_block(r_g), BRU=rank_block(r_u), BRD=rank_block(r_d),
        PRECISION="ieee" if g.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return a, planes[0] if parts == 1 else planes.sum(dim=0)


def column_parts(blocks: int, F: int, block_n: int, device: torch.device) -> int:
    """Programs per token block over F for the rows kernel: about four waves of the GPU's
    multiprocessors in all, each program at least four ``block_n``-wide tiles."""
    return programs_per_token(blocks, F, block_n, device, waves=4)


def gate_product_tokens(
    g: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    B_gate: torch.Tensor,
    B_up: torch.Tensor,
    A_down: torch.Tensor,
    token_slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (N, F) in g's dtype, h_d planes (P, N, r_d) float32 whose sum is h_d) for the formula in
    the module docstring, each token n in slot ``token_slots[n]`` ((N,) integers on g's device).

    g, u: (N, F) contiguous; h: (split, N, r_g + r_u) float32, the planes of the gate's and the up's
    shrinks (``triton_bgmv.shrink_planes``, gate's ranks first; slot 0's entries are not read);
    B_gate (S, F, r_g), B_up (S, F, r_u), A_down (S, r_d, F) contiguous."""
    tokens, F, r_g, r_u, r_d = _checked_sizes(g, u, B_gate, B_up, A_down)
    if h.dim() != 3 or h.shape[1:] != (tokens, r_g + r_u) or h.stride(2) != 1 or h.dtype != torch.float32:
        raise ValueError(f"h must be float32 planes (split, {tokens}, {r_g + r_u}); got {tuple(h.shape)} {h.dtype}")
    if token_slots.shape != (tokens,):
        raise ValueError(f"one slot per token: {tokens} tokens, slots of shape {tuple(token_slots.shape)}")
    parts = programs_per_token(tokens, F, TOKEN_BLOCK_N, g.device)
    cols, parts = split_evenly(F, parts, TOKEN_BLOCK_N)
    a = torch.empty_like(g)
    h_down = torch.empty(parts, tokens, r_d, dtype=torch.float32, device=g.device)
    _token_gate_product_kernel[(tokens, parts)](
        g, u, h, B_gate, B_up, A_down, token_slots, a, h_down,
        F, r_g, r_u, r_d, h.stride(1), h.stride(0), h_down.stride(1), h_down.stride(0), cols,
        SPLIT=h.shape[0], BN=TOKEN_BLOCK_N, BRG=rank_block(r_g), BRU=rank_block(r_u), BRD=rank_block(r_d),
    )  # fmt: skip
    return a, h_down
