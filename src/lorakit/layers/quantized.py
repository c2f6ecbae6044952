"""`LoraQuantizedLinear`: LoRA on a bitsandbytes 4-bit (NF4/FP4) or 8-bit linear layer (QLoRA).

    h = Q(W0) x + b + s * B (A dropout(x))      A: (r, d_in)   B: (d_out, r)

The base layer computes with its quantized weight Q(W0) (bitsandbytes' kernels); the adapter is
the same (A, B) as on a dense layer, sized from the layer's real ``in_features`` /
``out_features`` (the stored 4-bit tensor is packed, (d_out * d_in / 2, 1) uint8), in the layer's
compute dtype. Wherever a dense W0 is needed (DoRA's norm, the base output without the merged
adapters, merging, export) it is ``dequantized_weight``: bitsandbytes' own dequantization, so
exactly the W0 the base layer multiplies by (4-bit: its compute is ``x @ dequantize_4bit(W).T``).

Merging cannot write ``W0 + s B A`` back into 4 bits without losing most of the update (a typical
update is ~1% of W0, below the spacing of the 16 NF4 levels), so:
- ``merge`` refuses (``control.merge`` reports the share that would survive);
- ``merge_requantized`` does it on request: the original packed weight is kept (a 4-bit copy), the
  layer computes with ``quantize(W0 + changes)``, and the share of the update that survived is
  returned; ``unmerge`` puts the original back bit for bit;
- ``densify`` (``unload(merge=True)``, export) turns the layer into a plain ``LoraLinear`` over a
  dense ``nn.Linear`` holding the dequantized W0 in the compute dtype, where merging is exact.

Forward: a call of one active LoRA-family adapter (not DoRA: its norm needs the dense W0 each
step) on a 4-bit base, over more than one token, with x, the adapter and the base in the compute
dtype, takes ``kernels/quantized_lora.py``: the base GEMM and the adapter in one autograd
function that dequantizes W0 again in backward instead of keeping anything dense
(bitsandbytes' dequantization, or lorakit's Triton kernel into a shared buffer with
``tuning.TRITON_DEQUANT``). Everything else (8-bit bases, DoRA, several adapters, routed rows,
single-token decoding, which bitsandbytes serves with its 4-bit GEMV, autocast) runs the reference
formula of ``LoraLayer.forward`` around the bitsandbytes layer.
``fast_path = False`` forces the reference path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterStateError
from ..kernels import triton_dequant4, tuning
from ..kernels.casting import accumulation_dtype
from ..kernels.quantized_lora import quantized_lora_linear, weight_buffer
from ..quantization import (
    compute_dtype_of,
    dequantized_weight,
    keep_standard_packing,
    quant_type,
    quantized_bits,
    quantized_like,
    replace_weight,
)
from .linear import LoraLinear


class LoraQuantizedLinear(LoraLinear):
    """LoRA around a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``; see the module docstring."""

    quantized = True

    def __init__(self, base_layer: nn.Module) -> None:
        keep_standard_packing(base_layer)
        super().__init__(base_layer)
        # The packed weight as it was before the first requantized merge (None: none merged). Kept
        # in __dict__, not registered: it is no parameter of the model (state dict, optimizer).
        self.__dict__["original_weight"] = None

    # --- sizes and dtypes -------------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return self.base_layer.in_features

    @property
    def out_dim(self) -> int:
        return self.base_layer.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in: what the adapter is kept in by default."""
        return compute_dtype_of(self.base_layer)

    @property
    def quant_type(self) -> str:
        return quant_type(self.base_layer)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_dim,)

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.fast_path and not args and not kwargs:
            covered = self._fused_call(x)
            if covered is not None:
                A, B, scaling, dropout = covered
                bias = self.base_layer.bias
                bias = None if bias is None else bias.to(x.dtype)
                return quantized_lora_linear(x, self._dequantizer(x.dtype), bias, A, B, scaling, dropout)
        return super().forward(x, *args, **kwargs)

    def _fused_call(self, x: torch.Tensor):
        """(A, B, s, active dropout or None) when this call takes the fused 4-bit path (see the
        module docstring), else None."""
        state = self.__dict__
        if state["disabled"] or state["row_adapters"] is not None or state["merged_adapters"]:
            return None
        active = state["active_adapters"]
        if len(active) != 1 or active[0] not in state["_modules"]["lora_A"]._parameters:
            return None
        base = state["_modules"]["base_layer"]
        if quantized_bits(base) != 4 or x.numel() == x.shape[-1] or x.dtype != compute_dtype_of(base):
            return None
        if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return None
        name = active[0]
        fused = state["variants"][name].fused_factors(self, name)
        if fused is None or fused[3] is not None:  # VeRA's reference path; DoRA's magnitude
            return None
        A, B, scaling, _ = fused
        if A.dtype != B.dtype or A.dtype not in (x.dtype, torch.float32):
            return None
        A, B = A.to(x.dtype), B.to(x.dtype)  # fp32 adapters on a half compute dtype: as the dense path
        dropout = state["_modules"]["lora_dropout"]._modules[name]
        dropout = dropout if type(dropout) is nn.Dropout and dropout.training and dropout.p > 0 else None
        return A, B, scaling, dropout

    def _dequantizer(self, dtype: torch.dtype):
        """A callable giving the dense W0 (d_out, d_in) in ``dtype``, the values bitsandbytes'
        layer multiplies by: bitsandbytes' ``dequantize_4bit``, or with ``tuning.TRITON_DEQUANT``
        on a GPU lorakit's Triton kernel into the shared buffer."""
        weight = self.base_layer.weight
        state = weight.quant_state
        if not (tuning.TRITON_DEQUANT and triton_dequant4.available(weight.data, dtype)):
            return lambda: dequantized_weight(self.base_layer).to(dtype)
        shape = (self.out_dim, self.in_dim)
        nested = (
            (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if state.nested else None
        )

        def dequantize() -> torch.Tensor:
            buffer = weight_buffer(shape[0] * shape[1], dtype, weight.device)
            return triton_dequant4.dequantize(
                weight.data, state.code, state.absmax, state.blocksize, shape, dtype, nested, out=buffer
            )

        return dequantize

    # --- the dense W0 -----------------------------------------------------------------------------
    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """W0 (d_out, d_in), dequantized: of the kept original while adapters are merged."""
        return dequantized_weight(self.base_layer, self.original_weight)

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.unmerged_weight().to(x.dtype))

    def add_to_weight(self, delta: torch.Tensor) -> None:
        raise AdapterStateError(
            f"the base weight of this layer is {self.quant_type}-quantized and cannot take a change in place; "
            "lorakit.unload(model, merge=True) gives a dense model where it can"
        )

    # --- merging ----------------------------------------------------------------------------------
    def check_merge(self, names: list[str]) -> None:
        pending = [n for n in names if n in self.variants]
        if pending:
            share = self.surviving_share(pending[0])
            raise AdapterStateError(
                f"the base weight is {self.quant_type}-quantized: merging writes W0 + the update back in "
                f"{self.quant_type}, which here keeps {share:.1%} of adapter {pending[0]!r}'s update (the rest is "
                "rounded away). lorakit.unload(model, merge=True) dequantizes and merges exactly; "
                "lorakit.merge(model, requantize=True) merges in the quantized weight anyway and reports the loss"
            )

    def merge(self, name: str, final: bool = False) -> None:
        if not final:
            self.check_merge([name])
        self.densify()
        LoraLinear.merge(self, name, final=final)  # the class is LoraLinear now (see densify)

    @torch.no_grad()
    def surviving_share(self, name: str) -> float:
        """The share of adapter ``name``'s change that a requantized merge keeps on this layer:
        ⟨kept, change⟩ / ⟨change, change⟩, kept being what the quantized weight changes by
        (1: all of it; 0: nothing). Nothing is written."""
        change, _ = self.variants[name].merge_change(self, name, check=False)
        current = dequantized_weight(self.base_layer).to(change.dtype)
        target = self._merged_dense(self.merged_adapters) + change
        kept = dequantized_weight(self.base_layer, quantized_like(self.base_layer, target)).to(change.dtype) - current
        return _share(kept, change)

    @torch.no_grad()
    def merge_requantized(self, name: str) -> float:
        """Merge adapter ``name`` into the quantized weight: quantize(W0 + the merged changes);
        returns the share of its change that survived (see ``surviving_share``)."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is already merged; unmerge it before merging again")
        change, record = self.variants[name].merge_change(self, name, check=False)
        before = dequantized_weight(self.base_layer).to(change.dtype)
        target = self._merged_dense(self.merged_adapters) + change
        new = quantized_like(self.base_layer, target)
        kept = dequantized_weight(self.base_layer, new).to(change.dtype) - before
        if self.original_weight is None:
            self.__dict__["original_weight"] = self.base_layer.weight
        replace_weight(self.base_layer, new)
        if record is not None:
            self.merge_records[name] = record
        self.merged_adapters.append(name)
        return _share(kept, change)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is not merged")
        rest = [n for n in self.merged_adapters if n != name]
        if rest:
            replace_weight(self.base_layer, quantized_like(self.base_layer, self._merged_dense(rest)))
        else:  # the original packed weight, bit for bit
            replace_weight(self.base_layer, self.original_weight)
            self.__dict__["original_weight"] = None
        self.merge_records.pop(name, None)
        self.merged_adapters.remove(name)

    def _merged_dense(self, names: list[str]) -> torch.Tensor:
        """W0 plus the changes of merged adapters ``names``, dense, in float32 (or wider)."""
        weight = self.unmerged_weight()
        dense = weight.to(accumulation_dtype(weight.dtype))
        for n in names:
            dense = dense + self.variants[n].unmerge_change(self, n, self.merge_records.get(n)).to(dense.dtype)
        return dense

    @torch.no_grad()
    def densify(self, dtype: torch.dtype | None = None) -> None:
        """Replace the quantized base by a dense ``nn.Linear`` holding the dequantized W0 (plus the
        changes of adapters merged so far, exactly), in ``dtype`` (default: the compute dtype), and
        become a plain ``LoraLinear`` over it: merging is then exact. Used by ``unload`` and export."""
        dtype = dtype or self.compute_dtype
        base = self.base_layer
        weight = self._merged_dense(list(self.merged_adapters))
        dense = nn.Linear(self.in_dim, self.out_dim, bias=base.bias is not None, device=weight.device, dtype=dtype)
        dense.weight.data.copy_(weight)
        dense.weight.requires_grad_(False)
        if base.bias is not None:
            dense.bias.data.copy_(base.bias.data)
            dense.bias.requires_grad_(base.bias.requires_grad)
        dense.train(base.training)
        self.base_layer = dense
        # From here on this layer is exactly a LoraLinear over a dense weight (nothing quantized is
        # left to special-case), so it takes that class rather than carrying a flag checked everywhere.
        self.__dict__.pop("original_weight", None)
        self.__class__ = LoraLinear

    def extra_repr(self) -> str:
        return f"{self.quant_type}, {super().extra_repr()}"


def _share(kept: torch.Tensor, change: torch.Tensor) -> float:
    norm = float((change * change).sum())
    return float((kept * change).sum()) / norm if norm > 0 else 1.0


def densify_all(layers: Any, dtype: torch.dtype | None = None) -> int:
    """``densify`` every quantized layer among ``layers`` ((path, layer) pairs); how many."""
    count = 0
    for _, layer in layers:
        if isinstance(layer, LoraQuantizedLinear):
            layer.densify(dtype)
            count += 1
    return count
