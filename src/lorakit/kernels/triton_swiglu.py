"""Triton kernels for the fused MLP's SiLU gate (GPU only): h = silu(g) ⊙ u and its backward.

    h  = silu(g) ⊙ u                    g, u, h: (N, d_ff)
    ∂u = ∂h ⊙ silu(g)
    ∂g = ∂h ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))

The fused MLP (``gated_mlp.py``) keeps g and u only and recomputes h in backward. With torch that
is five elementwise passes over (N, d_ff) tensors forward-and-recompute (silu, product) and nine
in backward (two products, silu's backward): fourteen reads or writes of a tensor as large as the
MLP's widest activation. These kernels read g and u and write h (three), then read ∂h, g, u and
write ∂g, ∂u (five), each element computed in fp32 and rounded once. ∂g goes into ∂h's buffer,
which the caller no longer needs.

Used for CUDA tensors of a kernel dtype when Triton is importable (``available``); elsewhere the
caller's torch expressions compute the same values. The CPU tests run the kernels in Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from .triton_support import on_gpu_in_kernel_dtype, tl, triton

BLOCK = 2048


def available(g: torch.Tensor, u: torch.Tensor) -> bool:
    """True when the kernels run for these tensors: Triton importable, CUDA, one kernel dtype and
    shape, contiguous."""
    return (
        on_gpu_in_kernel_dtype(g)
        and g.dtype == u.dtype
        and g.shape == u.shape
        and g.is_contiguous()
        and u.is_contiguous()
    )


if triton is not None:

    @triton.jit
    def _forward_kernel(G, U, H, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(H + offsets, h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(DH, G, U, DU, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        dh = tl.load(DH + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(DU + offsets, (dh * g * sig).to(DU.dtype.element_ty), mask=mask)
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DH + offsets, dg.to(DH.dtype.element_ty), mask=mask)  # ∂g over ∂h, in place


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) ⊙ u, a new tensor of g's shape and dtype."""
    h = torch.empty_like(g)
    n = g.numel()
    _forward_kernel[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK)
    return h


def silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂g, ∂u) for h = silu(g) ⊙ u; ∂g is written over ``dh`` (contiguous, g's shape and dtype)."""
    du = torch.empty_like(u)
    n = g.numel()
    _backward_kernel[(triton.cdiv(n, BLOCK),)](dh, g, u, du, n, BLOCK=BLOCK)
    return dh, du
