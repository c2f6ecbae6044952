"""Triton BGMV kernels: each token's adapter, indexed by the token's slot, for decode batches.

    h[n]   = A[s_n] x[n]                                  shrink: (N, r_max) float32
    out[n] += B[s_n] h[n]  (+ gm1[s_n] ⊙ (out[n] - b))    expand: in place, out's dtype

    x: (N, d_in)   out: (N, d_out)   A_stack: (S, r_max, d_in)   B_stack: (S, d_out, r_max)

Punica's bgmv, whatever the number of adapters, in one launch or two (``tuning.BGMV_ONE_LAUNCH``).
One: program (n, j) computes token n's shrink from its slot's rows of A (every program of the
token repeats it: r × d_in reads served from L2) and expands it over its share j of the output
units: fewest launches, for eager steps, where each launch costs host time. Two, as vLLM's
lora_shrink / lora_expand: the shrink of a long d_in split over programs, each writing its partial
sums to its own plane of h (split, N, r_max), which the expand adds up as it reads h: no zeroed
buffer, no atomics, and no repeated shrink, for steps replayed in a CUDA graph, where launches
cost no host time and the repeated shrink is what is left (measured in docs/benchmarks.md). Tokens
of slot 0 (no adapter) return at once. The two kernels take up to three projections of one input
at once (``sibling_bgmv``: attention's q, k, v write their ranks side by side in h, and the expand
runs over their output blocks laid end to end), so siblings cost two launches in all; ``bgmv`` is
the one-projection case. A decode step has a few tokens per adapter, so reading the
factors per token costs little next to launching a GEMM per adapter; long prefills take grouped
GEMMs instead (``multi_lora.py``). Accumulation is fp32.

The CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``); without Triton
nothing here runs (``available`` is False) and ``multi_lora`` takes its torch paths.
"""

from __future__ import annotations

import torch

from . import tuning
from .graph_mode import in_cuda_graph
from .triton_support import on_gpu_in_kernel_dtype, rank_block, sm_count, split_evenly, tl, triton

BLOCK_K = 256  # d_in per shrink iteration
BLOCK_N = 128  # output units per expand program


def available(*tensors: torch.Tensor) -> bool:
    """True when the kernels should run: Triton importable, CUDA tensors of kernel dtypes,
    outside torch.compile (which traces the grouped GEMMs instead)."""
    return all(on_gpu_in_kernel_dtype(t) for t in tensors) and not torch.compiler.is_compiling()


if triton is not None:

    @triton.jit
    def _token_and_slot(SLOTS):
        """This program's token n (its first grid axis) and the token's slot."""
        n = tl.program_id(0)
        return n, tl.load(SLOTS + n)

    @triton.jit
    def _shrink_span(x_row, a_rows, rmask, start, end, BR: tl.constexpr, BK: tl.constexpr):
        """Columns [start, end) of one token's shrink: (BR,) float32 sums of A[slot] rows · x."""
        acc = tl.zeros((BR,), dtype=tl.float32)
        for k0 in range(start, end, BK):
            cols = k0 + tl.arange(0, BK)
            kmask = cols < end
            xk = tl.load(x_row + cols, mask=kmask, other=0.0).to(tl.float32)
            a = tl.load(a_rows + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * xk[None, :], axis=1)
        return acc

    @triton.jit
    def _expand_units(
        h, b_rows, stride_bn, rmask, out_row, units, umask, g_row, BIAS, HAS_DORA: tl.constexpr, HAS_BIAS: tl.constexpr
    ):
        """Output units ``units`` of one token: out += B[slot] h (+ (g - 1) ⊙ (out - b)), in place."""
        b = tl.load(b_rows + units[:, None] * stride_bn, mask=umask[:, None] & rmask[None, :], other=0.0)
        acc = tl.sum(b.to(tl.float32) * h[None, :], axis=1)
        o = tl.load(out_row + units, mask=umask, other=0.0).to(tl.float32)
        if HAS_DORA:
            g = tl.load(g_row + units, mask=umask, other=0.0).to(tl.float32)
            base = o
            if HAS_BIAS:
                base = o - tl.load(BIAS + units, mask=umask, other=0.0).to(tl.float32)
            acc += g * base
        tl.store(out_row + units, (o + acc).to(out_row.dtype.element_ty), mask=umask)

    @triton.jit
    def _one_launch_kernel(
        X,
        A,
        B,
        SLOTS,
        OUT,
        GM1,
        BIAS,
        d_in,
        d_out,
        r,
        stride_x,
        stride_as,
        stride_ar,
        stride_bs,
        stride_bn,
        stride_out,
        stride_g,
        units_per_program,
        HAS_DORA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BR: tl.constexpr,
        BK: tl.constexpr,
        BN: tl.constexpr,
    ):
        # Program (n, j): token n's whole shrink (each of the token's programs repeats it: its A
        # rows are small and shared in L2), then output units j*units_per_program onwards.
        n, slot = _token_and_slot(SLOTS)
        if slot == 0:  # no adapter
            return
        ranks = tl.arange(0, BR)
        rmask = ranks < r
        x_row = X + n.to(tl.int64) * stride_x
        h = _shrink_span(x_row, A + slot * stride_as + ranks[:, None] * stride_ar, rmask, 0, d_in, BR, BK)
        start = tl.program_id(1) * units_per_program
        end = tl.minimum(start + units_per_program, d_out)
        out_row = OUT + n.to(tl.int64) * stride_out
        b_rows = B + slot * stride_bs + ranks[None, :]
        for u0 in range(start, end, BN):
            units = u0 + tl.arange(0, BN)
            _expand_units(
                h,
                b_rows,
                stride_bn,
                rmask,
                out_row,
                units,
                units < end,
                GM1 + slot * stride_g,
                BIAS,
                HAS_DORA,
                HAS_BIAS,
            )

    @triton.jit
    def _shrink_kernel(
        X,
        SLOTS,
        H,
        A0,
        A1,
        A2,
        r0,
        r1,
        r2,
        stride_as0,
        stride_as1,
        stride_as2,
        stride_ar,
        d_in,
        stride_x,
        stride_h,
        stride_hs,
        k_per_split,
        BR: tl.constexpr,
        BK: tl.constexpr,
    ):
        # Program (n, part, g): projection g's shrink of token n over its part of d_in, into
        # columns r0 + .. + r_{g-1} onwards of h's plane ``part`` (one projection: g = 0 only).
        n, slot = _token_and_slot(SLOTS)
        if slot == 0:  # no adapter
            return
        g = tl.program_id(2)
        a = A0 + slot * stride_as0
        r = r0
        column = r0 * 0
        if g == 1:
            a = A1 + slot * stride_as1
            r = r1
            column = r0
        if g == 2:
            a = A2 + slot * stride_as2
            r = r2
            column = r0 + r1
        ranks = tl.arange(0, BR)
        rmask = ranks < r
        start = tl.program_id(1) * k_per_split
        end = tl.minimum(start + k_per_split, d_in)
        x_row = X + n.to(tl.int64) * stride_x
        acc = _shrink_span(x_row, a + ranks[:, None] * stride_ar, rmask, start, end, BR, BK)
        tl.store(H + tl.program_id(1) * stride_hs + n * stride_h + column + ranks, acc, mask=rmask)

    @triton.jit
    def _expand_kernel(
        H,
        SLOTS,
        OUT0,
        OUT1,
        OUT2,
        B0,
        B1,
        B2,
        d0,
        d1,
        d2,
        r0,
        r1,
        r2,
        stride_bs0,
        stride_bs1,
        stride_bs2,
        stride_bn0,
        stride_bn1,
        stride_bn2,
        stride_out0,
        stride_out1,
        stride_out2,
        blocks0,
        blocks1,
        stride_h,
        stride_hs,
        GM1,
        BIAS,
        stride_g,
        SPLIT: tl.constexpr,
        HAS_DORA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BR: tl.constexpr,
        BN: tl.constexpr,
    ):
        # Program (n, j): output block j of the projections' blocks laid end to end (blocks0 of the
        # first, blocks1 of the second, the rest of the third), token n. DoRA's term: one
        # projection only (``bgmv``).
        n, slot = _token_and_slot(SLOTS)
        if slot == 0:  # no adapter
            return
        block = tl.program_id(1)
        j = block  # the block within its projection
        out_row = OUT0 + n.to(tl.int64) * stride_out0
        b = B0 + slot * stride_bs0
        stride_bn = stride_bn0
        d_out = d0
        r = r0
        column = r0 * 0
        if block >= blocks0:
            out_row = OUT1 + n.to(tl.int64) * stride_out1
            b = B1 + slot * stride_bs1
            stride_bn = stride_bn1
            d_out = d1
            r = r1
            column = r0
            j = block - blocks0
        if block >= blocks0 + blocks1:
            out_row = OUT2 + n.to(tl.int64) * stride_out2
            b = B2 + slot * stride_bs2
            stride_bn = stride_bn2
            d_out = d2
            r = r2
            column = r0 + r1
            j = block - blocks0 - blocks1
        ranks = tl.arange(0, BR)
        rmask = ranks < r
        h = tl.zeros((BR,), dtype=tl.float32)
        for part in tl.static_range(SPLIT):
            h += tl.load(H + part * stride_hs + n * stride_h + column + ranks, mask=rmask, other=0.0)
        units = j * BN + tl.arange(0, BN)
        g_row = GM1 + slot * stride_g
        _expand_units(
            h, b + ranks[None, :], stride_bn, rmask, out_row, units, units < d_out, g_row, BIAS, HAS_DORA, HAS_BIAS
        )


def programs_per_token(tokens: int, length: int, block: int, device: torch.device, waves: int = 2) -> int:
    """How many programs share one token's (or token block's) ``length`` (d_in for the split
    shrink, d_out for the one-launch kernel's output units, F for the slot MLP's): enough to fill
    the GPU ``waves`` times, each with at least four ``block``-wide tiles."""
    by_fill = triton.cdiv(waves * sm_count(device), max(tokens, 1))
    by_work = max(1, length // (4 * block))
    return max(1, min(by_fill, by_work))


def _kernel_layout(x, outs, A_stacks, B_stacks):
    """The tensors as the kernels index them: unit last strides (x, the factors; A's rows d_in
    apart, as the shrink takes one row stride for every projection) and outputs written in place
    (whose last dimension must be contiguous already)."""
    if any(out.stride(1) != 1 for out in outs):
        raise ValueError("bgmv adds into its outputs in place: their last dimension must be contiguous")
    d_in = x.shape[1]
    x = x if x.stride(1) == 1 else x.contiguous()
    A_stacks = [A if A.stride(2) == 1 and A.stride(1) == d_in else A.contiguous() for A in A_stacks]
    B_stacks = [B if B.stride(2) == 1 else B.contiguous() for B in B_stacks]
    return x, A_stacks, B_stacks


def bgmv(
    out: torch.Tensor,
    x: torch.Tensor,
    token_slots: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    gm1: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """Add each token's adapter into ``out`` (N, d_out) in place; x (N, d_in), token_slots (N,)
    int64 in [0, S). ``gm1`` (S, d_out) and ``bias`` (d_out,): DoRA's term (``multi_lora``).
    ``split``: programs per token (None: chosen from the GPU's size): over the output units in
    the one-launch kernel, over d_in in the two-launch shrink. Which of the two runs:
    ``tuning.BGMV_ONE_LAUNCH``. Returns ``out``."""
    tokens = x.shape[0]
    r = A_stack.shape[1]
    if tokens == 0 or r == 0:
        return out
    x, (A_stack,), (B_stack,) = _kernel_layout(x, [out], [A_stack], [B_stack])
    one_launch = tuning.BGMV_ONE_LAUNCH
    if one_launch == "auto":  # one launch for eager calls, two in a CUDA graph (and its warm-up)
        one_launch = not in_cuda_graph(x)
    if not one_launch:
        _two_launches([out], x, token_slots, [A_stack], [B_stack], gm1, bias, split)
        return out
    d_in, d_out = x.shape[1], out.shape[1]
    # Programs per token over its output units: enough to fill the GPU about twice.
    parts = split or programs_per_token(tokens, d_out, BLOCK_N, x.device)
    units, parts = split_evenly(d_out, parts, BLOCK_N)
    _one_launch_kernel[(tokens, parts)](
        x,
        A_stack,
        B_stack,
        token_slots,
        out,
        gm1 if gm1 is not None else out,
        bias if bias is not None else out,
        d_in,
        d_out,
        r,
        x.stride(0),
        A_stack.stride(0),
        A_stack.stride(1),
        B_stack.stride(0),
        B_stack.stride(1),
        out.stride(0),
        gm1.stride(0) if gm1 is not None else 0,
        units,
        HAS_DORA=gm1 is not None,
        HAS_BIAS=bias is not None,
        BR=rank_block(r),
        BK=BLOCK_K,
        BN=BLOCK_N,
    )
    return out


def sibling_bgmv(
    outs: list[torch.Tensor],
    x: torch.Tensor,
    token_slots: torch.Tensor,
    A_stacks: list[torch.Tensor],
    B_stacks: list[torch.Tensor],
) -> None:
    """``bgmv`` for two or three projections of one input (attention's q, k, v; an MLP's gate and
    up) in two launches for all of them: one shrink writing every sibling's rank-r columns side
    by side in h (split, N, r_0 + r_1 + ...), one expand over the siblings' output blocks laid
    end to end. outs[k] (N, d_k) gets B_k[s_n] A_k[s_n] x[n] added in place; x (N, d_in);
    A_stacks[k] (S, r_k, d_in), B_stacks[k] (S, d_k, r_k). No DoRA term (a DoRA slot takes
    ``bgmv`` per projection). Each launch costs a CUDA graph's node ~5 µs on an H100 whatever its
    work (docs/benchmarks.md), so three projections take two launches where ``bgmv`` takes six."""
    count = len(outs)
    if not 2 <= count <= 3 or len(A_stacks) != count or len(B_stacks) != count:
        raise ValueError(f"sibling_bgmv takes two or three projections; got {count} outputs, {len(A_stacks)} A stacks")
    if x.shape[0] == 0:
        return
    x, A_stacks, B_stacks = _kernel_layout(x, outs, A_stacks, B_stacks)
    _two_launches(outs, x, token_slots, A_stacks, B_stacks)


def _two_launches(outs, x, token_slots, A_stacks, B_stacks, gm1=None, bias=None, split=None) -> None:
    """The shrink and the expand launch for 1–3 projections of x (laid out by ``_kernel_layout``).
    ``gm1``, ``bias``: DoRA's term, one projection only."""
    h = shrink_planes(x, token_slots, A_stacks, split)
    expand_planes(outs, h, token_slots, B_stacks, gm1, bias)


def shrink_planes(x: torch.Tensor, token_slots: torch.Tensor, A_stacks: list, split: int | None = None) -> torch.Tensor:
    """h (split, N, r_0 + r_1 + ...) float32: each token's shrink A_k[s_n] x[n] for 1–3 projections
    of x (N, d_in) (A_stacks[k] (S, r_k, d_in), laid out by ``_kernel_layout``), split over d_in
    (``split`` programs per token, None: from the GPU's size), each program writing its partial
    sums to its own plane; the planes' sum is the shrink. Tokens of slot 0 write nothing (their
    columns hold whatever the buffer held)."""
    count = len(A_stacks)
    tokens, d_in = x.shape
    split = split or programs_per_token(tokens, d_in, BLOCK_K, x.device)
    k_per_split, split = split_evenly(d_in, split, BLOCK_K)
    ranks = [A.shape[1] for A in A_stacks]
    h = torch.empty(split, tokens, sum(ranks), device=x.device, dtype=torch.float32)
    A3, r3 = _three(A_stacks, A_stacks[0]), _three(ranks, 0)
    _shrink_kernel[(tokens, split, count)](
        x,
        token_slots,
        h,
        *A3,
        *r3,
        *(A.stride(0) for A in A3),
        d_in,
        d_in,
        x.stride(0),
        h.stride(1),
        h.stride(0),
        k_per_split,
        BR=rank_block(max(ranks)),
        BK=BLOCK_K,
    )
    return h


def expand_planes(outs, h: torch.Tensor, token_slots: torch.Tensor, B_stacks: list, gm1=None, bias=None) -> None:
    """outs[k] (N, d_k) += B_k[s_n] h_k[n] in place for 1–3 projections, h (split, N, r_0 + r_1 +
    ...) float32 the planes of their shrinks (``shrink_planes``), summed as they are read; B_stacks[k]
    (S, d_k, r_k) with unit last strides. ``gm1``, ``bias``: DoRA's term, one projection only.
    Tokens of slot 0 are left as they are."""
    count = len(outs)
    split, tokens = h.shape[0], h.shape[1]
    ranks = [B.shape[2] for B in B_stacks]
    outs3, B3, r3 = _three(outs, outs[0]), _three(B_stacks, B_stacks[0]), _three(ranks, 0)
    d3 = [out.shape[1] for out in outs]
    blocks = [triton.cdiv(d, BLOCK_N) for d in d3] + [0] * (3 - count)
    _expand_kernel[(tokens, sum(blocks))](
        h,
        token_slots,
        *outs3,
        *B3,
        *_three(d3, 0),
        *r3,
        *(B.stride(0) for B in B3),
        *(B.stride(1) for B in B3),
        *(out.stride(0) for out in outs3),
        blocks[0],
        blocks[1],
        h.stride(1),
        h.stride(0),
        gm1 if gm1 is not None else h,
        bias if bias is not None else h,
        gm1.stride(0) if gm1 is not None else 0,
        SPLIT=split,
        HAS_DORA=gm1 is not None,
        HAS_BIAS=bias is not None,
        BR=rank_block(max(ranks)),
        BN=BLOCK_N,
    )


def _three(items, fill) -> list:
    """``items`` padded to three (the kernels take three projections)."""
    return list(items) + [fill] * (3 - len(items))
