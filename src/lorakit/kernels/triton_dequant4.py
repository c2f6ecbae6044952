"""Triton kernel: a bitsandbytes 4-bit (NF4/FP4) weight dequantized in one pass (GPU only).

    W[j] = code[q_j] * absmax[j // blocksize]                          plain absmax
    absmax[i] = code2[a_i] * absmax2[i // blocksize2] + offset         double quantization

    packed: (d_out * d_in / 2,) uint8, two codes per byte, the first element in the high nibble
    code: (16,) float32 (the NF4 or FP4 levels)   absmax: (blocks,) float32, or uint8 when nested
    code2: (256,) float32   absmax2: (blocks / blocksize2,) float32   W: (d_out, d_in), compute dtype

bitsandbytes' ``dequantize_4bit`` with double quantization runs two kernels (the 8-bit absmax
first, into a new float tensor, then the weight) and allocates its output on every call; QLoRA
dequantizes every layer's weight in the forward and again in the backward (twice more with
activation checkpointing), so that cost is paid per layer per pass. Here one program reads a
block of packed bytes and their (nested) scales and writes the dense elements, into a buffer the
caller may reuse. The values are bitsandbytes' own formula: equal to its output bit for bit in
Triton's CPU interpreter (``TRITON_INTERPRET=1``, the tests) and in bf16 on an H100; fp16/fp32
outputs there may differ in the last bit (the nested scale's multiply-add fused by the compiler).
The fused QLoRA path uses it only when ``tuning.TRITON_DEQUANT`` is set: faster per weight than
bitsandbytes' two kernels, no faster over a whole training step (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from .triton_support import tl, triton

BLOCK_BYTES = 1024  # packed bytes per program (2048 elements)


def available(packed: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when the kernel should run: Triton importable, the packed codes on a GPU, and an
    output dtype the kernel writes."""
    return (
        triton is not None
        and packed.is_cuda
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
        and not torch.compiler.is_compiling()
    )


if triton is not None:

    @triton.jit
    def _dequant_kernel(
        PACKED,
        CODE,
        ABSMAX,
        CODE2,
        ABSMAX2,
        OFFSET,
        OUT,
        n_bytes,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n_bytes
        byte = tl.load(PACKED + idx, mask=mask, other=0).to(tl.int32)
        # Both elements of a byte share one absmax block (block sizes are even).
        block = (2 * idx) // BLOCKSIZE
        if NESTED:
            a8 = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(CODE2 + a8, mask=mask, other=0.0) * tl.load(
                ABSMAX2 + block // BLOCKSIZE2, mask=mask, other=0.0
            )
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
        high = tl.load(CODE + (byte >> 4), mask=mask, other=0.0) * scale
        low = tl.load(CODE + (byte & 15), mask=mask, other=0.0) * scale
        # Interleave (high, low) pairs into 2 * BLOCK consecutive elements: one contiguous store.
        pairs = tl.reshape(tl.join(high, low), (2 * BLOCK,))
        elems = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(OUT + elems, pairs.to(OUT.dtype.element_ty), mask=elems < 2 * n_bytes)


def dequantize(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, int, float] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense weight ``shape`` in ``dtype`` from packed 4-bit codes (see the module docstring).

    ``nested``: (code2, absmax2, blocksize2, offset) when the absmax is double-quantized (then
    ``absmax`` holds uint8 codes); offset is a one-element tensor on the device (read by the
    kernel: no host synchronisation). ``out``: a contiguous tensor of at least ``shape``'s elements to
    write into (its first elements, viewed as ``shape``); None allocates one."""
    numel = shape[0] * shape[1]
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # a bf16/fp32 quant_storage holds the same bytes
    if packed.numel() * 2 != numel or blocksize % 2:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold a {shape} weight in blocks of {blocksize}")
    if out is None:
        out = torch.empty(numel, device=packed.device, dtype=dtype)
    elif out.dtype != dtype or not out.is_contiguous() or out.numel() < numel:
        raise ValueError(f"out must be a contiguous {dtype} tensor of at least {numel} elements")
    out = out.reshape(-1)[:numel]
    code2, absmax2, blocksize2, offset = nested if nested is not None else (code, absmax, 2, code)
    grid = (triton.cdiv(packed.numel(), BLOCK_BYTES),)
    _dequant_kernel[grid](
        packed,
        code,
        absmax,
        code2,
        absmax2,
        offset,
        out,
        packed.numel(),
        BLOCKSIZE=blocksize,
        BLOCKSIZE2=blocksize2,
        NESTED=nested is not None,
        BLOCK=BLOCK_BYTES,
    )
    return out.view(shape)
