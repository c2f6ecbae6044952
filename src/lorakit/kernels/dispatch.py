"""Which fused computation a `LoraLinear` call uses, given its tensors.

The fused functions (``lora_linear.py``, ``dora_linear.py``) cover the common training and
inference case: an ``nn.Linear`` base with a frozen weight, one active unmerged LoRA or DoRA
adapter (plain, rsLoRA, LoRA-FA, DyLoRA's nested rank, AdaLoRA's scaled A), no per-row routing,
all tensors in one compute dtype (or autocast, which casts them to its dtype here; fp32 adapters
on a bf16/fp16 base are likewise computed in the base's dtype). The layer decides whether a call
is covered and hands over its tensors as `FusedOperands` (``LoraLinear.fused_operands``);
anything else runs the layer's reference forward, which is always available and gives the same
values (tests compare them). Nothing here reads a layer.

Factored or merged, per direction (LoRA without dropout; see ``lora_linear.py``): the factored
forward costs a read-modify-write of the (N, d_out) output, about 2 N d_out elements of traffic,
the merged one the build of W0 + sBA, about 4 d_in d_out (copy W0, then a GEMM that reads and
writes it); so the forward merges when N > 2 d_in. Backward likewise with the (N, d_in) input
gradient: it merges when N > 2 d_out. Long training batches merge the wide layers in the direction
where that pays; short ones (generation, small batches) never merge. ``tuning.MERGE_RATIO``
scales both thresholds (0: always merge, infinity: never), for benchmarks.

DoRA counts the same way (``dora_merge_directions``): factored, it also scales the (N, d_out)
output (backward: the gradient) by c and reads W0 once for the factored norm; merged, its build
also norms and scales the rows, which the Triton kernel does in the same two passes and torch in
about seven. So a GPU merges DoRA from N > d_in / 4 on (training batches, as before), the CPU
only from N > 1.5 d_in (its training batches of a few hundred tokens stay factored).

Under torch.compile with a dynamic batch shape, N is symbolic, and comparing it with a threshold
would guard on the comparison: a new graph for every batch whose N lands on the other side of a
layer's break-even (on a CPU minutes of compiling each). ``planned_tokens`` reads N's hint instead,
the size of the batch being traced, without a guard: the choice is fixed when the graph is traced.
Both ways compute the same values, so only the speed of later batches of other sizes differs. A
torch before 2.13 has no such hint: there a dynamic graph takes the factored way (a graph for one
shape still plans from its N).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

try:  # torch >= 2.13: a symbolic size's hint, without a guard
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:
    optimization_hint = None
try:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
except ImportError:  # a torch too old for it: the comparison guards, and compiled steps recompile per choice

    def statically_known_true(condition) -> bool:
        return bool(condition)


from . import triton_merge, tuning
from .dora_linear import DoraLinearFunction
from .lora_linear import LoraLinearFunction
from .projection import Projection


class FusedOperands(NamedTuple):
    """What a fused call of one linear layer computes with: out = x W0ᵀ + b + s (x_d Aᵀ) Bᵀ
    (DoRA: rescaled per output row to the magnitude).

    weight: W0 (d_out, d_in), frozen; bias: (d_out,) or None; A: (r, d_in); B: (d_out, r), both in
    x's dtype except under autocast, where ``call_in_autocast_dtype`` casts everything; scaling: s;
    magnitude: DoRA's m (d_out,) or None for LoRA; dropout: the active dropout that gives x_d from
    x (a callable: it draws the mask from the same random stream as the reference path), or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None
    dropout: Callable[[torch.Tensor], torch.Tensor] | None


def planned_tokens(x: torch.Tensor) -> int:
    """The rows of x (N for x (..., d_in)) as the merge choice counts them: a plain int, under
    torch.compile the hint of a symbolic N (see the module docstring). A torch without
    ``optimization_hint`` (before 2.13) returns a symbolic N as it is, and ``plan_directions``
    then merges only where that holds for every N."""
    tokens = x.numel() // x.shape[-1]
    return tokens if optimization_hint is None else optimization_hint(tokens)


def merge_directions(tokens: int, d_in: int, d_out: int) -> tuple[bool, bool]:
    """(merge the forward, merge the backward) for a call with ``tokens`` rows."""
    ratio = tuning.MERGE_RATIO
    return tokens > ratio * 2 * d_in, tokens > ratio * 2 * d_out


def plan_directions(tokens: int, weight: torch.Tensor, magnitude: torch.Tensor | None) -> tuple[bool, bool]:
    """(merge the forward, merge the backward) for a LoRA (``magnitude`` None) or DoRA call."""
    d_out, d_in = weight.shape
    if magnitude is None:
        forward, backward = merge_directions(tokens, d_in, d_out)
    else:
        forward, backward = dora_merge_directions(tokens, d_in, d_out, triton_merge.available(weight, dora=True))
    # Plain bools as they are; a symbolic comparison (see planned_tokens) is True only where it
    # holds for every size, and asking adds no guard.
    return statically_known_true(forward), statically_known_true(backward)


def dora_merge_directions(tokens: int, d_in: int, d_out: int, fused_build: bool) -> tuple[bool, bool]:
    """(merge the forward, merge the backward) for a DoRA call with ``tokens`` rows; ``fused_build``:
    the merged weight comes from the Triton kernel (see the module docstring)."""
    # Passes over a (d_out, d_in) matrix per build: forward (with the norm), backward.
    forward_build, backward_build = (2, 2) if fused_build else (7, 6)
    weight_elements = tuning.MERGE_RATIO * d_in * d_out
    return (
        4 * tokens * d_out > (forward_build - 1) * weight_elements,
        2 * tokens * (d_in + d_out) > backward_build * weight_elements,
    )


def fused_linear(x: torch.Tensor, operands: FusedOperands) -> torch.Tensor:
    """The layer's output (..., d_out) for x (..., d_in) through a fused function."""
    weight, bias, A, B, scaling, magnitude, dropout = operands
    return call_in_autocast_dtype(_apply, (x, weight, bias, A, B), scaling, magnitude, dropout)


def call_in_autocast_dtype(function, tensors: tuple[torch.Tensor | None, ...], *extra):
    """``function(*tensors, *extra)``; under autocast the tensors (None stays None) are first cast
    to the autocast dtype and autocast is off inside. That is what autocast would do to a linear
    layer's operands, done once so that a fused function runs in one dtype. The casts are autograd
    ops, so fp32 parameters get fp32 gradients. ``extra`` is passed as it is (DoRA's magnitudes are
    among it: they stay in their own dtype, and the norms are summed in fp32)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return function(*tensors, *extra)
    dtype = torch.get_autocast_dtype(device_type)
    cast = [None if t is None else t.to(dtype) for t in tensors]
    with torch.autocast(device_type, enabled=False):
        return function(*cast, *extra)


def projection_operands(x: torch.Tensor, operands: list[FusedOperands]):
    """(the ``Projection`` records, [weight, bias, A, B] of each projection in one list, the
    magnitudes): what a function fusing several projections of one input x (``gated_mlp.py``,
    ``sibling_projections.py``) takes, for operands without dropout (dropout is per layer)."""
    tokens = planned_tokens(x)
    plans, linear_tensors, magnitudes = [], [], []
    for weight, bias, A, B, scaling, magnitude, _ in operands:
        plans.append(Projection(scaling, *plan_directions(tokens, weight, magnitude)))
        linear_tensors += [weight, bias, A, B]
        magnitudes.append(magnitude)
    return tuple(plans), linear_tensors, magnitudes


def _apply(x, weight, bias, A, B, scaling, magnitude, dropout):
    tokens = planned_tokens(x)
    if magnitude is not None:
        return DoraLinearFunction.apply(
            x, weight, bias, A, B, magnitude, scaling, *plan_directions(tokens, weight, magnitude)
        )
    if dropout is not None:
        # The dropout module draws the mask (same random stream as the reference path).
        return LoraLinearFunction.apply(x, dropout(x), weight, bias, A, B, scaling, False, False)
    return LoraLinearFunction.apply(x, None, weight, bias, A, B, scaling, *plan_directions(tokens, weight, None))
