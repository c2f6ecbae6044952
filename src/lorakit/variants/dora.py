"""DoRA (Liu et al. 2024): weight-decomposed LoRA.

    W = m ⊙ (W0 + s B A) / ||W0 + s B A||        m: one trained magnitude per output unit

The norm is taken per output unit (``layer.unit_norm``) and treated as a constant in backward
(the paper's memory-saving choice, also PEFT's). m starts at ``||W0 + s B A||``, so a fresh adapter
changes nothing. With several adapters each one's change is taken against W0 alone, so the order
of active or merged adapters does not matter (docs/architecture.md). Merged, a DoRA adapter scales
W0 by c = m / norm per unit; the norm of that moment is kept to unmerge exactly, and a merge that
would leave W0 scaled by about 0 is refused (W0 could not be recovered).

State on the layer: ``lora_magnitude_vector[name]`` (``layer.magnitude_shape()``), PEFT's name, so
state-dict and file keys are PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import register_variant
from ..errors import AdapterFileError
from ..kernels.casting import accumulation_dtype
from ..layers.variant import Variant

SLOT = "lora_magnitude_vector"


class Dora(Variant):
    name = "dora"
    title = "DoRA"
    legacy_flag = "use_dora"
    parameter_targets = False
    low_rank = False  # m / ||W0 + dW|| (W0 + dW) - W0 is not a rank-r matrix
    slots = (SLOT,)
    file_slots = {"magnitude": SLOT}
    file_suffixes = {"." + SLOT: "magnitude"}
    needs_base_output = True
    inspection_note = "DoRA: spectra are those of s·B·A; the magnitudes also rescale each output unit"

    def peft_config(self, config: Any, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "use_dora": True}

    # --- state -------------------------------------------------------------------------------
    def attach(self, layer: Any, name: str, planned_layer: Any, trainable: bool) -> None:
        magnitude = getattr(planned_layer, "extras", {}).get("magnitude")
        if magnitude is None:  # m = ||W0 + s B A||: outputs do not change
            magnitude = self.weight_norm(layer, name).to(layer.lora_A[name].dtype)
        layer.slot(SLOT)[name] = nn.Parameter(magnitude, requires_grad=trainable)

    @staticmethod
    def magnitude(layer: Any, name: str) -> torch.Tensor:
        return layer.__dict__["_modules"][SLOT][name]

    @torch.no_grad()
    def weight_norm(self, layer: Any, name: str) -> torch.Tensor:
        """``||W0 + s B A||`` per output unit, in ``magnitude_shape()`` (W0: ``unmerged_weight()``);
        a constant for autograd, so no graph is built for the dense matrix."""
        weight = layer.unmerged_weight()
        return layer.unit_norm(weight.to(accumulation_dtype(weight.dtype)) + layer.delta_weight(name))

    # --- forward -----------------------------------------------------------------------------
    def increment(self, layer: Any, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        # m/||W|| * (W0 x + s B A x) + b  ==  base_out + (scale - 1) W0 x + scale s B A x
        x_d = layer.dropped_input(x, name)
        lora = self.lora_output(layer, x_d, name)
        scale = self.magnitude(layer, name) / self.weight_norm(layer, name).to(lora.dtype)
        if isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training:
            bias = layer.output_bias()
            base = base_out if bias is None else base_out - bias
        else:
            base = layer.base_output_without_bias(x_d)
        return ((scale - 1) * base.to(lora.dtype) + scale * lora).to(base_out.dtype)

    def fused_factors(self, layer: Any, name: str):
        A, B, s, _ = super().fused_factors(layer, name)
        return A, B, s, layer.__dict__["_modules"][SLOT]._parameters[name]

    # --- merging -----------------------------------------------------------------------------
    def scale(self, layer: Any, name: str, norm: torch.Tensor) -> torch.Tensor:
        """c = m / norm, laid out to broadcast against the base weight."""
        return layer.unit_view(self.magnitude(layer, name).to(norm.dtype) / norm)

    def change(
        self, layer: Any, name: str, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor
    ) -> torch.Tensor:
        """``(c - 1) W0 + c dW`` with c = m / norm per unit: DoRA's change to W0 (= weight)."""
        scale = self.scale(layer, name, norm)
        return (scale - 1) * weight + scale * delta

    @torch.no_grad()
    def weight_change(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(``m / ||W0 + dW|| * (W0 + dW) - W0`` laid out like W0 in float32 or wider, the norm
        ``||W0 + dW||`` it used), W0 being ``unmerged_weight()``."""
        delta = layer.delta_weight(name)
        weight = layer.unmerged_weight().to(delta.dtype)
        norm = layer.unit_norm(weight + delta)
        return self.change(layer, name, weight, delta, norm), norm

    def merge_change(self, layer: Any, name: str, check: bool) -> tuple[torch.Tensor, Any]:
        change, norm = self.weight_change(layer, name)
        if check:
            self.require_merge_recoverable(layer, name, {**layer.merge_records, name: norm})
        return change, norm

    def unmerge_change(self, layer: Any, name: str, record: Any) -> torch.Tensor:
        remaining = {n: r for n, r in layer.merge_records.items() if n != name}
        layer.require_recoverable(
            remaining,
            f"unmerging DoRA adapter {name!r}",
            "unmerge in the reverse order of merging, as lorakit.unmerge(model) does",
        )
        # The change merge added, with the norm of then (W0 has not changed since).
        delta = layer.delta_weight(name)
        weight = layer.unmerged_weight().to(delta.dtype)
        return self.change(layer, name, weight, delta, record)

    def merged_scale(self, layer: Any, name: str, record: Any) -> torch.Tensor:
        return self.scale(layer, name, record)

    def check_merge(self, layer: Any, name: str, records: dict[str, Any]) -> None:
        records[name] = self.weight_norm(layer, name)
        self.require_merge_recoverable(layer, name, records)

    @staticmethod
    def require_merge_recoverable(layer: Any, name: str, records: dict[str, Any]) -> None:
        dora = [n for n, r in records.items() if layer.variants[n].merged_scale(layer, n, r) is not None]
        fix = (
            f"merge fewer of the DoRA adapters {dora} at once (lorakit.unmerge(model) takes merged ones out)"
            if len(dora) > 1
            else "keep it unmerged"
        )
        layer.require_recoverable(
            records,
            f"merging DoRA adapter {name!r}",
            f"{fix}, or write their effect into "
            f"the base weights for good with lorakit.combine(model, {dora}, into_base=True)",
        )

    # --- files -------------------------------------------------------------------------------
    def extra_tensors(self, layer: Any, name: str) -> dict[str, torch.Tensor]:
        return {"magnitude": self.magnitude(layer, name)}

    def read_extras(self, layer_plan: Any, found: dict[str, torch.Tensor]) -> None:
        super().read_extras(layer_plan, found)
        if "magnitude" not in found:
            raise AdapterFileError(f"the file has no lora_magnitude_vector for DoRA module {layer_plan.path!r}")
        expected = layer_plan.layer.magnitude_shape()
        if tuple(found["magnitude"].shape) != tuple(expected):
            raise AdapterFileError(
                f"lora_magnitude_vector of module {layer_plan.path!r} has shape "
                f"{tuple(found['magnitude'].shape)} in the file but the model needs {expected}"
            )
        layer_plan.extras["magnitude"] = found["magnitude"].to(dtype=layer_plan.A.dtype, device=layer_plan.A.device)


register_variant(Dora())
