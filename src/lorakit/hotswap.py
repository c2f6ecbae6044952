"""`hotswap_adapter`: put another adapter's weights into an existing adapter's tensors, in place.

A compiled model (``torch.compile``) guards on the identity, shape and dtype of the adapter
tensors and on the Python values around them (scaling, active names), not on the tensors' values.
Swapping adapters by ``set_adapter`` changes the names the graph was traced with, so it
recompiles; copying a new adapter into the slot the graph already uses does not. Ranks smaller
than the slot's are zero-padded, which leaves the update unchanged:

    [A; 0] (r_slot, d_in),  [B (s_new / s_slot), 0] (d_out, r_slot)
    =>  s_slot [B s_new/s_slot, 0] [A; 0] = s_new B A

so the slot's fixed scaling s_slot still gives the new adapter's update exactly (up to the
rounding of the rescaled B in a low-precision dtype). Modules the new adapter does not target
get a zero update. Everything is checked before the first tensor is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterFileError, AdapterStateError
from .init_names import changes_base
from .io.layout import group_factors
from .io.load import read_adapter
from .kernels.casting import accumulation_dtype
from .layers.parameter import LoraParameter
from .state import adapter_configs, lora_layers, merged_adapters, require_adapters


@dataclass
class Incoming:
    """One module's part of the adapter being swapped in."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    extras: dict[str, torch.Tensor]  # the variant's own per-module tensors (DoRA's m), by file slot


def hotswap_adapter(model: nn.Module, source: str | os.PathLike, name: str = "default") -> None:
    """Replace the weights of adapter ``name`` by those of ``source``, keeping its tensors.

    ``source`` is an adapter directory (lorakit's or PEFT's files) or the name of another adapter
    loaded in the model. The new adapter may have a smaller or equal rank per module and must
    target a subset of the slot's modules; LoRA into LoRA, DoRA into DoRA. The slot keeps its
    name, config (r, alpha) and active state; only its values change.
    """
    require_adapters(model, [name])
    if name in merged_adapters(model):
        raise AdapterStateError(f"adapter {name!r} is merged into the weights; unmerge it before hot-swapping")
    slots = {path: layer for path, layer in lora_layers(model) if name in layer.lora_A}
    incoming = _from_model(model, str(source)) if str(source) in adapter_configs(model) else _from_files(Path(source))
    _check(name, slots, incoming)
    with torch.no_grad():
        for path, layer in slots.items():
            _write(layer, name, incoming.get(path))


def _from_model(model: nn.Module, source: str) -> dict[str, Incoming]:
    result = {}
    for path, layer in lora_layers(model):
        if source in layer.lora_A:
            _require_swappable(layer, source, "save it and hot-swap the saved directory instead")
            A, B, s = layer.live_factors(source)
            result[path] = Incoming(A.detach(), B.detach(), s, layer.variants[source].saved_extras(layer, source))
    return result


def _from_files(directory: Path) -> dict[str, Incoming]:
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is neither an adapter directory nor the name of a loaded adapter")
    config, weights = read_adapter(directory)  # one save's files, under the folder's lock
    if not config.variant_object.hot_swappable:
        raise AdapterFileError(
            f"{directory} holds a {config.variant_object.title} adapter; hot-swap takes LoRA and DoRA adapters"
        )
    if changes_base(config.init):
        raise AdapterFileError(
            f"{directory} was saved by PEFT with init_lora_weights={config.init!r} before "
            "conversion: its weights belong to a changed base weight. Load it with load_adapter "
            "(which rebuilds that base), save it with save_adapter (which converts it) and "
            "hot-swap the saved directory"
        )
    parts, _ = group_factors(weights)
    result = {}
    for path, found in parts.items():
        if "lora_A" not in found or "lora_B" not in found:
            raise AdapterFileError(f"{directory}: module {path!r} lacks lora_A or lora_B; the adapter is incomplete")
        extras = {slot: value for slot, value in found.items() if slot not in ("lora_A", "lora_B")}
        result[path] = Incoming(found["lora_A"], found["lora_B"], config.scaling_for(path), extras)
    return result


def _require_swappable(layer: nn.Module, name: str, advice: str) -> None:
    """Hot-swap moves plain LoRA and DoRA factors; AdaLoRA's E, VeRA's projection and a PiSSA/OLoRA
    init (which changed the base weight) do not carry over."""
    if not layer.variants[name].hot_swappable:
        raise AdapterStateError(
            f"adapter {name!r} is a {layer.variants[name].title} adapter; hot-swap takes LoRA and DoRA"
        )
    if name in layer.init_factors:
        raise AdapterStateError(
            f"adapter {name!r} was initialised with PiSSA/OLoRA (it changed the base weight); {advice}"
        )


def _check(name: str, slots: dict[str, nn.Module], incoming: dict[str, Incoming]) -> None:
    extra = sorted(set(incoming) - set(slots))
    if extra:
        raise AdapterStateError(
            f"the new adapter targets modules adapter {name!r} does not: {extra[:5]}; hot-swap can only fill "
            "existing slots (add the adapter with a config covering these modules instead)"
        )
    for path, layer in slots.items():
        _require_swappable(layer, name, "it cannot serve as a hot-swap slot")
        new = incoming.get(path)
        variant = layer.variants[name]
        if new is None:
            if variant.file_slots:  # its own tensors (DoRA's m) have no empty value
                raise AdapterStateError(
                    f"the new adapter has nothing for {variant.title} module {path!r}; it cannot be left empty"
                )
            continue
        slot_A, slot_B = layer.lora_A[name], layer.lora_B[name]
        if isinstance(layer, LoraParameter) and new.A.shape != slot_A.shape:
            raise AdapterStateError(
                f"module {path!r} is a parameter target, whose factors interleave the experts: "
                f"hot-swap needs the slot's rank there ({layer.rank(name)})"
            )
        r_new, r_slot = new.A.shape[0], slot_A.shape[0]
        if r_new > r_slot:
            raise AdapterStateError(
                f"module {path!r}: the new adapter has rank {r_new}, the slot {name!r} only {r_slot}; create the "
                "slot with the largest rank you will swap in (smaller ranks are zero-padded)"
            )
        if (
            new.A.shape[1:] != slot_A.shape[1:]
            or new.B.shape[0] != slot_B.shape[0]
            or new.B.shape[2:] != slot_B.shape[2:]
        ):
            raise AdapterStateError(
                f"module {path!r}: the new adapter's shapes {tuple(new.A.shape)}, "
                f"{tuple(new.B.shape)} do not fit the layer; is it for a different model?"
            )
        if set(new.extras) != set(variant.file_slots):
            kind = variant.title if variant.file_slots else "plain LoRA"
            raise AdapterStateError(
                f"module {path!r}: slot {name!r} is {kind} and the new adapter is not; "
                "hot-swap DoRA into DoRA and LoRA into LoRA"
            )
        if layer.scaling[name] == 0:
            raise AdapterStateError(f"slot {name!r} has scaling 0 (alpha = 0) and cannot carry another adapter")


def _write(layer: nn.Module, name: str, new: Incoming | None) -> None:
    A, B = layer.lora_A[name], layer.lora_B[name]
    A.zero_()
    B.zero_()
    if new is None:
        return
    r = new.A.shape[0]
    A[:r].copy_(new.A.to(A.device, A.dtype))
    ratio = new.scaling / layer.scaling[name]
    wide = accumulation_dtype(B.dtype)  # rescale before rounding to the slot's dtype
    B[:, :r].copy_((new.B.to(B.device, wide) * ratio).to(B.dtype))
    for slot, tensor in layer.variants[name].extra_tensors(layer, name).items():
        tensor.copy_(new.extras[slot].to(tensor.device, tensor.dtype))
