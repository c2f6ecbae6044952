"""Fused LoRA on a 4-bit base: the dense weight is rebuilt where it is used, never kept.

    out = x Wᵀ + b + s (x_d Aᵀ) Bᵀ          W = dequantize(packed 4-bit W0): (d_out, d_in)
    ∂x  = g W + s (g B) A                    ∂A = s (g B)ᵀ x_d       ∂B = s gᵀ (x_d Aᵀ)

x: (N, d_in) (leading dimensions flattened), A: (r, d_in), B: (d_out, r), g: (N, d_out).

QLoRA's base layer (bitsandbytes' ``matmul_4bit``) already dequantizes W in the forward and again
in the backward rather than keeping it; the adapter then runs as separate modules around it
(dropout, two GEMMs, a scale, an add: each an autograd node keeping its own tensors). This one
function does the base GEMM and the adapter together, as ``lora_linear.py`` does for a dense
base: it saves only x_d and the small x_d Aᵀ (N, r), adds the low-rank term into the output in
place, and rebuilds W in backward with the caller's ``dequantize``: bitsandbytes' own
``dequantize_4bit`` by default, or (``tuning.TRITON_DEQUANT``, GPU) the Triton kernel of
``triton_dequant4.py`` writing into one buffer per (device, dtype, stream) reused by every layer.
Either way W is what bitsandbytes' layer multiplies by.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .lora_linear import lora_backward, lora_forward

_BUFFERS: dict[tuple, torch.Tensor] = {}


def weight_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous buffer of at least ``numel`` elements, shared by every 4-bit layer that
    dequantizes on this device, dtype and stream (kernels on one stream run in order, so a
    layer's GEMM has read the buffer before the next layer's dequantization writes it). It
    grows to the largest weight seen and is kept: one dense layer's worth of memory."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, dtype, stream)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < numel:
        _BUFFERS.pop(key, None)  # free the smaller one before allocating the larger
        buffer = _BUFFERS[key] = torch.empty(numel, device=device, dtype=dtype)
    return buffer


def release_buffers() -> None:
    """Drop the shared dequantization buffers (their memory goes back to torch's allocator)."""
    _BUFFERS.clear()


class QuantizedLoraFunction(torch.autograd.Function):
    """``out = x Wᵀ + b + s (x_d Aᵀ) Bᵀ`` with W = ``dequantize()``; see the module docstring.

    Args of ``apply``: x (..., d_in); x_dropped (same shape, or None without dropout);
    dequantize: a callable returning W (d_out, d_in) in x's dtype (it may return a shared buffer:
    W is used at once and never saved); bias (d_out,) or None, frozen; A (r, d_in); B (d_out, r);
    scaling s. Returns (..., d_out).
    """

    @staticmethod
    def forward(ctx, x, x_dropped, dequantize: Callable[[], torch.Tensor], bias, A, B, scaling: float):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
        out, xa, _ = lora_forward(x2, xl2, dequantize(), bias, A, B, scaling, merge=False)
        ctx.save_for_backward(xl2, xa, A, B)
        ctx.dequantize, ctx.scaling, ctx.lead = dequantize, scaling, lead
        ctx.separate_lora_input = x_dropped is not None
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xl2, xa, A, B = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_xd, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        weight = ctx.dequantize() if (need_x or need_xd) else None
        grad_x, grad_xd, grad_A, grad_B = lora_backward(
            g,
            xl2,
            xa,
            weight,
            A,
            B,
            ctx.scaling,
            False,
            need_x or need_xd,
            need_A,
            need_B,
            separate_lora_input=ctx.separate_lora_input,
        )
        grad_bias = g.sum(0) if need_bias else None
        lead = ctx.lead
        grad_x = grad_x.view(*lead, -1) if (grad_x is not None and need_x) else None
        grad_xd = grad_xd.view(*lead, -1) if grad_xd is not None else None
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None


def quantized_lora_linear(
    x: torch.Tensor,
    dequantize: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + s (dropout(x) Aᵀ) Bᵀ`` (..., d_out) through ``QuantizedLoraFunction``."""
    x_dropped = dropout(x) if dropout is not None else None
    return QuantizedLoraFunction.apply(x, x_dropped, dequantize, bias, A, B, scaling)
