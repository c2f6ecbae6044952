"""DoRA's per-row rescale c = m / ||W0 + s B A||, with or without building W0 + s B A.

    W0 (d_out, d_in), A (r, d_in), B (d_out, r), m (d_out,)

Merged (``dora_weight``): build W = W0 + sBA, take its row norms and scale its rows: the matrix a
merged GEMM needs anyway. Factored (``factored_rescale``): the same norms without the matrix,

    ||W_i||² = ||W0_i||² + 2s B_i · (W0 Aᵀ)_i + s² B_i (A Aᵀ) B_iᵀ

one small-K GEMM over W0 (W0 Aᵀ, (d_out, r)) and rank-r products; ||W0||² is cached per frozen
weight. That is what a factored forward needs, where N is too small for a merged build to pay
(``dispatch.dora_merge_directions``). Both sum the norms in fp32 (or wider); the products W0 Aᵀ
and W0 + sBA are rounded to the weight's dtype first, as the GEMMs produce them (measured in
bf16: c within 4e-4 relative factored, 2e-4 merged). The expansion loses no more than that as
long as the low-rank change is not far larger than W0 (LoRA's regime: B starts at zero).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import triton_merge
from .casting import accumulation_dtype, as_dtype
from .lora_linear import merged_weight

# id(weight) -> (weak reference to it, (its version, storage, dtype, shape), ||W0||² per row); see
# base_row_norms_squared. Keyed by id: a WeakKeyDictionary compares tensors with ==, elementwise.
_ROW_NORMS: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def dora_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c ⊙ (W0 + s B A), c) with c = m / ||W0 + s B A|| per row, the norm computed in fp32 (or
    wider); c comes back in the precision it was applied in (the weight's dtype with torch, fp32
    with the Triton kernel)."""
    if triton_merge.available(weight, dora=True):
        return triton_merge.dora_weight(weight, A, B, scaling, magnitude)
    combined = merged_weight(weight, A, B, scaling)
    norm = torch.linalg.vector_norm(combined, dim=1, dtype=accumulation_dtype(combined.dtype))
    rescale = as_dtype(magnitude / norm, combined.dtype)
    return combined.mul_(rescale[:, None]), rescale


def factored_rescale(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """c = m / ||W0 + s B A|| per row (d_out,) in fp32 (or wider), without building W0 + s B A."""
    acc = accumulation_dtype(weight.dtype)
    projected = as_dtype(weight @ A.t(), acc)  # W0 Aᵀ: (d_out, r)
    A_acc, B_acc = as_dtype(A, acc), as_dtype(B, acc)
    cross = (B_acc * projected).sum(1)  # B_i · (W0 Aᵀ)_i
    low_rank = ((B_acc @ (A_acc @ A_acc.t())) * B_acc).sum(1)  # B_i (A Aᵀ) B_iᵀ = ||(BA)_i||²
    squared = base_row_norms_squared(weight) + (2 * scaling) * cross + (scaling * scaling) * low_rank
    return as_dtype(magnitude, acc) / squared.clamp_min(0).sqrt()  # rounding can dip below 0 at 0


def base_row_norms_squared(weight: torch.Tensor) -> torch.Tensor:
    """||W0_i||² (d_out,) in fp32 (or wider), kept per weight parameter until the weight changes.

    The base weight is frozen, so its norms would otherwise be re-read from the whole matrix on
    every call. A write in place (``copy_``, ``mul_``, ...) bumps the tensor's version, a ``.to()``
    / ``.data =`` gives it new storage: either recomputes. A write through ``weight.data`` bumps
    nothing and is not seen (torch's own caveat for ``.data``). Only parameters are kept: a
    tensor made for this call (autocast's cast of the weight) has nothing to reuse, an inference
    tensor has no version, and under torch.compile the norms are computed in the graph."""
    acc = accumulation_dtype(weight.dtype)
    # is_compiling first: dynamo cannot trace is_inference() (a graph break under fullgraph).
    if torch.compiler.is_compiling() or not isinstance(weight, nn.Parameter) or weight.is_inference():
        return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.shape)
    cached = _ROW_NORMS.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == key:
        return cached[2]
    with torch.no_grad():
        norms = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
    _ROW_NORMS[id(weight)] = (weakref.ref(weight, _forget(id(weight))), key, norms)
    return norms


def _forget(weight_id: int):
    """The callback that drops a weight's entry when the weight is freed."""

    def forget(reference: weakref.ref) -> None:
        entry = _ROW_NORMS.get(weight_id)
        if entry is not None and entry[0] is reference:
            del _ROW_NORMS[weight_id]

    return forget
