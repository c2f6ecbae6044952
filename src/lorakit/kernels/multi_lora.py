"""Many LoRA adapters in one batch: each token takes the adapter in its slot of a stack.

    out[n] += B[s_n] (A[s_n] x[n])  (+ gm1[s_n] ⊙ (out[n] - b))          s_n = slot of token n

    x: (N, d_in)   out: (N, d_out)   A_stack: (S, r_max, d_in)   B_stack: (S, d_out, r_max)

Each slot holds one adapter with its rank zero-padded to r_max and its scaling folded into B; slot
0 is all zeros (no adapter), so its tokens are skipped. The optional DoRA term: an adapter whose
forward is g ⊙ (W0 x + s B A x) + b per output unit (g = m / ||W0 + s B A||) adds
(g - 1) ⊙ W0 x + g ⊙ s B A x; with g folded into B, only the (S, d_out) table ``gm1 = g - 1``
(zero for plain LoRA slots) and W0 x = out - b are left to compute here.

How a call runs (``add_multi_lora``), all giving the same values:
- decode on a GPU (few tokens): BGMV, one Triton program per token and output block, indexed by
  the token's slot (Punica's bgmv, vLLM's lora_shrink/expand; ``triton_bgmv.py``);
- a prefill's rows (each row's tokens one slot; ``SlotPlan.rows``): two batched GEMMs, each row
  with its slot's factors gathered, the expand accumulated into ``out`` (beta = 1), so the product
  never makes a separate pass over the output (no DoRA term; GPU dtypes, or fp32/fp64 on the CPU);
- otherwise SGMV through ``torch.nn.functional.grouped_mm`` (CPU and GPU), one for the shrink and
  one for the expand: where the tokens come in long runs of one slot (a prefill's rows), one group
  per run, the tokens multiplied where they lie with each run's factors gathered (Punica's SGMV
  segments: no pass over the activations besides the GEMMs); else the routed tokens sorted by slot
  (a gather of x and a scatter-add of the result), which reads each slot's factors once whatever
  its token count. ``SlotPlan`` holds both layouts, computed once per forward for every layer;
- a loop over the slots present, one GEMM pair per slot, where grouped_mm cannot run (float64,
  strides that are not 16-byte multiples, a device without it) or autograd must see the call.

The rank-r intermediate is float32 (accumulated in fp32 and kept so, as vLLM's shrink output is);
the expand reads it in the factors' dtype. The product is added into ``out`` in place unless
autograd records the call (then a new tensor comes back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import triton_bgmv, tuning
from .host_copy import host_to_device

GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class SlotPlan:
    """Where the tokens of one forward go: computed once from the per-token slots, reused by every
    layer whose stack has ``num_slots`` slots (the slot numbering is shared).

    Attributes:
        tokens: N, the number of tokens.
        num_slots: S, slots of the stacks this plan indexes (slot 0 included).
        token_slots: (N,) int64 on the device: each token's slot (BGMV reads it).
        index: (M,) int64 on the device: the M tokens with a slot other than 0, sorted by slot
            (stable: a row's tokens stay in order).
        span: (start, stop) when ``index`` is ``arange(start, stop)`` (rows already grouped by
            slot): the tokens are then a slice and need no gather or scatter. Else None.
        sorted_slots: (M,) int64 on the device: the slot of each token of ``index``.
        offsets: (S - 1,) int32 on the device: cumulative token counts of slots 1 .. S-1 over
            ``index`` (grouped_mm's ``offs``).
        present: the slots (> 0) that have tokens, ascending; ``counts``: their token counts.
        segments: (run_slots (G,) int64, run_ends (G,) int32) on the device when the tokens come
            in runs of one slot averaging ``tuning.SEGMENT_TOKENS`` or more (G runs, slot 0's
            included; run_ends are cumulative: grouped_mm's ``offs``), else None.
        graphed: ``token_slots`` is a buffer rewritten between CUDA-graph replays
            (``for_graph``); the host-side fields are empty and every call takes BGMV (or,
            without it, the gathered products: ``_gathered``).
        rows: (T, row_slots (R,) int64 on the device) when the tokens are R rows of T tokens,
            each row one slot, T at least ``tuning.SEGMENT_TOKENS`` (a prefill; ``for_rows``),
            else None.
    """

    tokens: int
    num_slots: int
    token_slots: torch.Tensor
    index: torch.Tensor
    span: tuple[int, int] | None
    sorted_slots: torch.Tensor
    offsets: torch.Tensor
    present: tuple[int, ...]
    counts: tuple[int, ...]
    segments: tuple[torch.Tensor, torch.Tensor] | None = None
    graphed: bool = False
    rows: tuple[int, torch.Tensor] | None = None

    @staticmethod
    def for_graph(token_slots: torch.Tensor, num_slots: int) -> SlotPlan:
        """A plan over a fixed device buffer ``token_slots`` (N,) int64 that the caller rewrites
        between replays of a CUDA graph captured with it: every call takes BGMV, whose only
        routing input is that buffer (the host never sees the slots, so nothing is skipped or
        sorted)."""
        empty = token_slots.new_zeros(0)
        return SlotPlan(
            tokens=token_slots.shape[0],
            num_slots=num_slots,
            token_slots=token_slots,
            index=empty,
            span=None,
            sorted_slots=empty,
            offsets=empty.to(torch.int32),
            present=(),
            counts=(),
            graphed=True,
        )

    @staticmethod
    def build(token_slots: torch.Tensor, num_slots: int, device: torch.device | str) -> SlotPlan:
        """The plan for ``token_slots`` (N,) integers in [0, num_slots), given on the CPU (the
        routing knows them there); the index tensors are moved to ``device`` once."""
        slots = token_slots.to("cpu", torch.int64)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
            raise ValueError(f"token slots must lie in [0, {num_slots}); got {slots.min()}..{slots.max()}")
        counts = torch.bincount(slots, minlength=num_slots)
        order = torch.argsort(slots, stable=True)
        skipped = int(counts[0])
        index = order[skipped:]
        m = index.numel()
        span = None
        if m and int(index[-1]) - int(index[0]) == m - 1 and bool((index[1:] > index[:-1]).all()):
            span = (int(index[0]), int(index[-1]) + 1)
        present = tuple(int(s) for s in torch.nonzero(counts[1:]).flatten() + 1)
        device = torch.device(device)
        n = slots.numel()
        # Runs of one slot (where consecutive tokens change slot); not needed when the routed
        # tokens are one slice already.
        use_runs, runs = False, 0
        if n and span is None:
            starts = torch.nonzero(slots[1:] != slots[:-1]).flatten() + 1
            runs = starts.numel() + 1
            use_runs = n >= runs * tuning.SEGMENT_TOKENS
        parts = [slots, index, slots[index], torch.cumsum(counts[1:], 0)]
        if use_runs:  # each run's slot, and where it ends
            parts += [slots[torch.cat([starts.new_zeros(1), starts])], torch.cat([starts, starts.new_full((1,), n)])]
        # One host-to-device copy for the index tensors (a plan is built every step).
        packed = host_to_device(torch.cat(parts), device)
        end = n + 2 * m + num_slots - 1
        segments = (packed[end : end + runs], packed[end + runs :].to(torch.int32)) if use_runs else None
        return SlotPlan(
            tokens=n,
            num_slots=num_slots,
            token_slots=packed[:n],
            index=packed[n : n + m],
            span=span,
            sorted_slots=packed[n + m : n + 2 * m],
            offsets=packed[n + 2 * m : end].to(torch.int32),
            present=present,
            counts=tuple(int(counts[s]) for s in present),
            segments=segments,
        )

    @staticmethod
    def for_rows(row_slots: list[int], tokens_per_row: int, num_slots: int, device: torch.device | str) -> SlotPlan:
        """The plan when every token of batch row i takes slot ``row_slots[i]`` (x laid out as
        (rows, tokens_per_row, d) flattened)."""
        slots = torch.tensor(row_slots, dtype=torch.int64).repeat_interleave(tokens_per_row)
        plan = SlotPlan.build(slots, num_slots, device)
        if tokens_per_row >= tuning.SEGMENT_TOKENS and plan.present:
            # Each row's slot: every T-th token's, a view of the plan's device tensor (no copy).
            plan = dataclasses.replace(plan, rows=(tokens_per_row, plan.token_slots[::tokens_per_row]))
        return plan


def takes_bgmv(plan: SlotPlan, *tensors: torch.Tensor) -> bool:
    """True when a call of ``plan``'s tokens on ``tensors`` runs the Triton BGMV kernels: a graphed
    plan, or few tokens (``tuning.BGMV_TOKENS``), on a GPU with Triton."""
    return (plan.graphed or plan.tokens <= tuning.BGMV_TOKENS) and triton_bgmv.available(*tensors)


def shared_form(plan: SlotPlan, x: torch.Tensor) -> str | None:
    """How projections sharing one call on x (``layers/slot_siblings.py``, ``layers/slot_mlp.py``)
    run ``plan``'s tokens: "tokens" (BGMV's batches: ``takes_bgmv``), "rows" (a prefill's rows,
    ``plan.rows``; never a graphed plan's), or None (neither: each layer alone)."""
    if takes_bgmv(plan, x):
        return "tokens"
    return "rows" if plan.rows is not None else None


def add_multi_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    plan: SlotPlan,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    gm1: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out`` (N, d_out) plus each token's adapter (see the module docstring); x (N, d_in).

    ``gm1`` (S, d_out): DoRA's g - 1 per slot (None: no DoRA slot), with ``bias`` (d_out,) the
    base bias that ``out`` holds (None: none). Returns ``out`` itself, changed in place, unless
    autograd records the call (grad enabled and a tensor requiring grad): then a new tensor."""
    if plan.graphed:
        if plan.tokens != x.shape[0]:
            raise ValueError(f"the graphed plan covers {plan.tokens} tokens but x has {x.shape[0]}")
        if takes_bgmv(plan, x, A_stack, B_stack, out):
            return triton_bgmv.bgmv(out, x, plan.token_slots, A_stack, B_stack, gm1, bias)
        return _gathered(out, x, plan.token_slots, A_stack, B_stack, gm1, bias)
    if not plan.present:
        return out
    if plan.tokens != x.shape[0] or out.shape[0] != x.shape[0]:
        raise ValueError(f"the plan covers {plan.tokens} tokens but x has {x.shape[0]} and out {out.shape[0]}")
    if A_stack.shape[0] != plan.num_slots:
        raise ValueError(f"the plan indexes {plan.num_slots} slots but the stack has {A_stack.shape[0]}")
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (out, x, A_stack, B_stack, gm1, bias)
    )
    if tracked:
        return _per_slot(out, x, plan, A_stack, B_stack, gm1, bias, in_place=False)
    if takes_bgmv(plan, x, A_stack, B_stack, out):
        triton_bgmv.bgmv(out, x, plan.token_slots, A_stack, B_stack, gm1, bias)
        return out
    if plan.rows is not None and gm1 is None and _batched_rows_run(x, A_stack, B_stack, out):
        return _batched_rows(out, x, plan, A_stack, B_stack)
    if _grouped_runs(x, A_stack, B_stack, out):
        if plan.segments is not None:
            return _grouped_segments(out, x, plan, A_stack, B_stack, gm1, bias)
        return _grouped(out, x, plan, A_stack, B_stack, gm1, bias)
    return _per_slot(out, x, plan, A_stack, B_stack, gm1, bias, in_place=True)


# --- SGMV through grouped_mm ----------------------------------------------------------------------
_GROUPED_FAILED: set[tuple[str, torch.dtype]] = set()


def _aligned(t: torch.Tensor) -> bool:
    # grouped_mm wants every stride but the unit one to be a multiple of 16 bytes.
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def _grouped_runs(x: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, out: torch.Tensor) -> bool:
    return (
        tuning.GROUPED_MM
        and hasattr(F, "grouped_mm")
        and x.dtype in GROUPED_DTYPES
        and A_stack.dtype == B_stack.dtype
        and (x.device.type, x.dtype) not in _GROUPED_FAILED
        and x.shape[1] * x.element_size() % 16 == 0
        and A_stack.shape[1] * A_stack.element_size() % 16 == 0
        and out.shape[1] * out.element_size() % 16 == 0
        and _aligned(A_stack)
        and _aligned(B_stack)
    )


def _sgmv(xs: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
    """Group g's rows of xs (M, d_in) times A_t[g] (d_in, r) then B_t[g] (r, d_out): (M, d_out), the
    groups ending at ``offsets``; None where this device or build has no such grouped GEMMs (then
    remembered, and the callers loop over the slots)."""
    try:
        h = _shrink(xs, A_t, offsets)
        if h.dtype != B_t.dtype:
            if xs.device.type == "cuda":
                h = h.to(B_t.dtype)  # as vLLM's expand reads its fp32 shrink output
            else:
                B_t = B_t.float()
        return F.grouped_mm(h, B_t, offs=offsets)
    except (RuntimeError, NotImplementedError):
        _GROUPED_FAILED.add((xs.device.type, xs.dtype))
        return None


def _grouped(out, x, plan, A_stack, B_stack, gm1, bias) -> torch.Tensor:
    """SGMV over the routed tokens sorted by slot (a slice of x when already grouped)."""
    xs = x[plan.span[0] : plan.span[1]] if plan.span else x.index_select(0, plan.index)
    if xs.stride(-1) != 1 or not _aligned(xs):
        xs = xs.contiguous()
    # (S-1, d_in, r) and (S-1, r, d_out): column-major views of the stacks, no copy.
    y = _sgmv(xs, A_stack[1:].transpose(1, 2), B_stack[1:].transpose(1, 2), plan.offsets)
    if y is None:
        return _per_slot(out, x, plan, A_stack, B_stack, gm1, bias, in_place=True)
    target = out[plan.span[0] : plan.span[1]] if plan.span else None
    if gm1 is not None:
        base = target if target is not None else out.index_select(0, plan.index)
        base = base if bias is None else base - bias
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        y.addcmul_(gm1.index_select(0, plan.sorted_slots), base)
    if target is not None:
        target.add_(y.to(out.dtype))
    else:
        out.index_add_(0, plan.index, y.to(out.dtype))
    return out


def _grouped_segments(out, x, plan, A_stack, B_stack, gm1, bias) -> torch.Tensor:
    """SGMV over runs of one slot: group g is run g's tokens, multiplied in place in x with the
    factors of the run's slot (gathered: (G, r, d) copies of the small factors, not of x)."""
    run_slots, run_ends = plan.segments
    xs = x if x.stride(-1) == 1 and _aligned(x) else x.contiguous()
    A_t = A_stack.index_select(0, run_slots).transpose(1, 2)  # (G, d_in, r)
    B_t = B_stack.index_select(0, run_slots).transpose(1, 2)  # (G, r, d_out)
    y = _sgmv(xs, A_t, B_t, run_ends)
    if y is None:
        return _per_slot(out, x, plan, A_stack, B_stack, gm1, bias, in_place=True)
    if gm1 is not None:
        base = out if bias is None else out - bias
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        y.addcmul_(gm1.index_select(0, plan.token_slots), base)
    return out.add_(y.to(out.dtype))


# --- every token's factors gathered: routing by a device tensor alone --------------------------------
def _gathered(out, x, token_slots, A_stack, B_stack, gm1, bias) -> torch.Tensor:
    """Each token's factors gathered by its slot, (N, r, d_in) and (N, d_out, r), and two batched
    products: what a graphed plan computes where the Triton BGMV kernel does not run (its slots
    are only on the device, so nothing on the host may depend on them). For decode batches."""
    wide = torch.promote_types(x.dtype, torch.float32)
    A_n = A_stack.index_select(0, token_slots).to(wide)
    B_n = B_stack.index_select(0, token_slots).to(wide)
    h = torch.bmm(A_n, x.to(wide).unsqueeze(2))  # (N, r, 1)
    y = torch.bmm(B_n, h).squeeze(2)  # (N, d_out)
    if gm1 is not None:
        base = out if bias is None else out - bias
        y = y + gm1.index_select(0, token_slots).to(wide) * base.to(wide)
    return out.add_(y.to(out.dtype))


# --- rows of one slot each: batched GEMMs ----------------------------------------------------------
def _batched_rows_run(x: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, out: torch.Tensor) -> bool:
    # One dtype throughout (a GPU's half-precision GEMMs accumulate in fp32; on the CPU only fp32
    # and wider, where the rank-r intermediate is then fp32 too), contiguous rows to view as 3-D.
    return (
        tuning.BATCHED_ROWS
        and x.dtype == A_stack.dtype == B_stack.dtype == out.dtype
        and (x.device.type == "cuda" or x.dtype in (torch.float32, torch.float64))
        and x.is_contiguous()
        and out.is_contiguous()
    )


def _batched_rows(out, x, plan, A_stack, B_stack) -> torch.Tensor:
    """R rows of T tokens, row i in slot s_i: out_i += (x_i A[s_i]ᵀ) B[s_i]ᵀ as two batched GEMMs,
    the expand accumulating into ``out`` (beta = 1: no separate product and add pass over the
    (N, d_out) output). Rows of slot 0 multiply its zero factors."""
    T, row_slots = plan.rows
    rows = x.shape[0] // T
    A_r = A_stack.index_select(0, row_slots)  # (R, r, d_in)
    B_r = B_stack.index_select(0, row_slots)  # (R, d_out, r)
    h = torch.bmm(x.view(rows, T, -1), A_r.transpose(1, 2))  # (R, T, r)
    out.view(rows, T, -1).baddbmm_(h, B_r.transpose(1, 2))
    return out


def lora_then_base(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: SlotPlan, A_stack, B_stack, gm1
) -> torch.Tensor | None:
    """x Wᵀ plus each row's adapter for a prefill's rows (``plan.rows``), (N, d_out) for x (N, d_in)
    and the base weight (d_out, d_in): the adapters' products written first (the expand writes the
    output, no read), then the base GEMM accumulated onto them (beta = 1). The base GEMM has the
    arithmetic to hide its read of the output, which ``_batched_rows``'s expand, reading and
    writing the output after it, does not. None where it does not apply (no rows, a bias, a DoRA
    slot, which needs W0 x on its own, dtypes or layouts the batched GEMMs do not take, autograd
    recording, ``tuning.LORA_FIRST`` off): the caller runs the base GEMM and ``add_multi_lora``."""
    if gm1 is not None:
        return None
    outs = siblings_then_base(x, [weight], [bias], plan, [A_stack], [B_stack])
    return outs[0] if outs is not None else None


def siblings_then_base(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list, plan: SlotPlan, A_stacks: list, B_stacks: list
) -> list[torch.Tensor] | None:
    """``lora_then_base`` for projections of one input x (N, d_in) (attention's q, k, v): their A
    stacked for one shrink, h = x [A_1; A_2; ...][s]ᵀ (R, T, r_1 + r_2 + ...), which reads x once
    for all of them; then per projection its expand written and its base GEMM accumulated onto it.
    weights[k] (d_k, d_in), biases[k] (must be None), A_stacks[k] (S, r_k, d_in), B_stacks[k]
    (S, d_k, r_k); no DoRA slots. Returns the outputs (N, d_k), or None where ``lora_then_base``
    would not apply (also under autocast, and for BGMV's batches: ``takes_bgmv``)."""
    if (
        not tuning.LORA_FIRST
        or plan.rows is None
        or plan.graphed
        or torch.is_grad_enabled()
        or torch.is_autocast_enabled(x.device.type)  # the GEMMs' dtypes would differ
        or plan.tokens != x.shape[0]
        or any(bias is not None for bias in biases)
        or takes_bgmv(plan, x, *A_stacks)
        or any(w.dtype != x.dtype or w.dim() != 2 for w in weights)
        or any(A.shape[0] != plan.num_slots for A in A_stacks)
        or not all(_batched_rows_run(x, A, B, x) for A, B in zip(A_stacks, B_stacks))
    ):
        return None
    h = rows_shrink(x, plan, A_stacks)
    outs, start = [], 0
    for weight, A, B in zip(weights, A_stacks, B_stacks):
        r = A.shape[1]
        outs.append(expand_then_base(h[:, start : start + r], x, weight, plan, B))
        start += r
    return outs


def rows_shrink(x: torch.Tensor, plan: SlotPlan, A_stacks: list[torch.Tensor]) -> torch.Tensor:
    """h = x [A_1; A_2; ...][s]ᵀ (N, r_1 + r_2 + ...) in x's dtype for a prefill's rows
    (``plan.rows``, row i in slot s_i): one batched GEMM, one read of x (N, d_in) for every
    projection; A_stacks[k] (S, r_k, d_in)."""
    T, row_slots = plan.rows
    gathered = [A.index_select(0, row_slots) for A in A_stacks]  # (R, r_k, d_in) each
    A_r = gathered[0] if len(gathered) == 1 else torch.cat(gathered, dim=1)
    return torch.bmm(x.view(-1, T, x.shape[1]), A_r.transpose(1, 2)).view(x.shape[0], A_r.shape[1])


def expand_then_base(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, plan: SlotPlan, B_stack) -> torch.Tensor:
    """h B[s]ᵀ + x Wᵀ (N, d_out) for a prefill's rows: the expand of h (N, r) (x's dtype) writes
    a new output, the base GEMM of x (N, d_in) and weight (d_out, d_in) accumulates onto it."""
    T, row_slots = plan.rows
    B_r = B_stack.index_select(0, row_slots)  # (R, d_out, r)
    out = torch.bmm(h.view(x.shape[0] // T, T, h.shape[1]), B_r.transpose(1, 2)).view(x.shape[0], B_r.shape[1])
    return out.addmm_(x, weight.t())


_WIDE_OUTPUT_FAILED: set[tuple[str, torch.dtype]] = set()


def _shrink(xs: torch.Tensor, A_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, r) = each token's x A[slot]ᵀ: float32 (accumulated in fp32), except where a GPU's
    grouped GEMM cannot write fp32 for half inputs (then rounded to their dtype, as a plain GEMM
    of that dtype would be)."""
    if xs.dtype == torch.float32:
        return F.grouped_mm(xs, A_t, offs=offsets)
    if xs.device.type != "cuda":
        # The CPU's grouped_mm gives half-precision outputs only for half inputs: widen the inputs.
        return F.grouped_mm(xs.float(), A_t.float(), offs=offsets)
    key = (xs.device.type, xs.dtype)
    if key not in _WIDE_OUTPUT_FAILED:
        try:
            return F.grouped_mm(xs, A_t, offs=offsets, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):
            _WIDE_OUTPUT_FAILED.add(key)
    return F.grouped_mm(xs, A_t, offs=offsets)


# --- one GEMM pair per slot --------------------------------------------------------------------
def _per_slot(out, x, plan, A_stack, B_stack, gm1, bias, in_place: bool) -> torch.Tensor:
    wide = torch.promote_types(x.dtype, torch.float32)
    start = 0
    base = out if gm1 is None else (out if bias is None else out - bias)
    deltas = []
    for slot, count in zip(plan.present, plan.counts):
        index = plan.index[start : start + count]
        start += count
        xs = x.index_select(0, index).to(wide)
        h = F.linear(xs, A_stack[slot].to(wide))  # (count, r) in fp32 (or wider)
        y = F.linear(h, B_stack[slot].to(wide))
        if gm1 is not None:
            y = y + gm1[slot].to(wide) * base.index_select(0, index).to(wide)
        deltas.append((index, y.to(out.dtype)))
    for index, y in deltas:  # after every read of ``base``, which may be ``out`` itself
        out = out.index_add_(0, index, y) if in_place else out.index_add(0, index, y)
    return out
