"""Choosing what runs: `set_adapter`, `adapters`, `use_adapters`, `disable_adapters`, `adapter_batch`,
`merge`, `unmerge`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import AdapterStateError
from .layers import ModulesToSave
from .layers.routing import RowRouting
from .state import (
    active_adapters,
    adapter_configs,
    adapter_modules,
    lora_layers,
    merged_adapters,
    require_adapters,
    saved_modules,
)

log = logging.getLogger("lorakit.control")


def adapters(model: nn.Module) -> list[str]:
    """Names of the model's adapters, in the order they were added."""
    return list(adapter_configs(model))


def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> None:
    """Make these adapter(s) the active ones; several active adapters add their updates."""
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    require_adapters(model, names)
    dropped = [n for n in merged_adapters(model) if n not in names]
    if dropped:
        raise AdapterStateError(
            f"adapter(s) {dropped} are merged into the weights and would stay in effect; "
            "call lorakit.unmerge(model) before switching adapters"
        )
    for path, wrapper in saved_modules(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise AdapterStateError(
                f"adapters {owners} each have their own copy of {path!r} (modules_to_save); "
                "only one of them can be active at a time"
            )
    for module in adapter_modules(model):
        module.active_adapters = list(names)


def _check_not_merged(what: str, model: nn.Module) -> None:
    merged = merged_adapters(model)
    if merged:
        raise AdapterStateError(
            f"{what} needs unmerged adapters, but {merged} are merged; call lorakit.unmerge(model) first"
        )


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as the base model alone."""
    _check_not_merged("disable_adapters", model)
    with _set_within(adapter_modules(model), "disabled", True):
        yield model


@contextmanager
def use_adapters(model: nn.Module, names: str | Sequence[str]) -> Iterator[nn.Module]:
    """Within the block exactly the adapters ``names`` run (``[]``: none, the base model), all rows alike.

    The parameters of every other adapter are frozen inside the block (an adapter that does not
    run gets no gradient and must not look trainable to an optimizer built there); the named
    adapters keep their ``requires_grad`` flags. Afterwards, also when the block raises, the
    previous active set, ``disable_adapters`` state, ``adapter_batch`` routing and every
    parameter's ``requires_grad`` flag are restored as they were on entry.

    DPO's reference pass is ``with torch.no_grad(), use_adapters(model, []): ...``: the policy's
    own base weights, no second copy of the model. Refused (AdapterStateError) while an adapter is
    merged, since a merged update cannot be switched off; an unknown name raises AdapterNameError.
    """
    wanted = [names] if isinstance(names, str) else list(names)
    require_adapters(model, wanted)
    _check_not_merged("use_adapters", model)
    for path, wrapper in saved_modules(model):
        owners = [n for n in wanted if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise AdapterStateError(
                f"adapters {owners} each have their own copy of {path!r} (modules_to_save); "
                "only one of them can be active at a time"
            )
    modules = list(adapter_modules(model))
    before = [(list(m.active_adapters), m.disabled, m.row_adapters) for m in modules]
    flags = {p: p.requires_grad for p in model.parameters()}
    # A tensor the named adapters share with another one (VeRA's projections) keeps its flag.
    kept = {id(t) for m in modules for t in _adapter_tensors(m, lambda name: name in wanted)}
    try:
        for module in modules:
            module.active_adapters, module.disabled, module.row_adapters = list(wanted), False, None
            for tensor in _adapter_tensors(module, lambda name: name not in wanted):
                if isinstance(tensor, nn.Parameter) and id(tensor) not in kept:
                    tensor.requires_grad_(False)
        yield model
    finally:
        for module, (active, disabled, rows) in zip(modules, before):
            module.active_adapters, module.disabled, module.row_adapters = active, disabled, rows
        for param, flag in flags.items():
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def _adapter_tensors(module: nn.Module, chosen) -> Iterator[torch.Tensor]:
    """The tensors a LoRA layer or modules_to_save wrapper holds for the adapters ``chosen(name)`` picks."""
    if isinstance(module, ModulesToSave):
        for name, copy in module.modules_to_save.items():
            if chosen(name):
                yield from copy.parameters()
        return
    for name, variant in module.variants.items():
        if chosen(name):
            yield from variant.trained_tensors(module, name)


@contextmanager
def adapter_batch(model: nn.Module, names_per_row: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, batch row i runs with adapter ``names_per_row[i]`` (None: base model).

    Each row's output equals what the model gives for that row with its adapter alone active.
    Where autograd has nothing to record (``torch.no_grad``, inference mode, or frozen adapters
    and inputs) and dropout is inactive, each linear layer takes its LoRA and DoRA adapters into
    one stack (built once, kept until their tensors change) and adds them all with the
    multi-adapter kernels (``kernels/multi_lora.py``); anything else runs a loop over the
    adapters present.
    """
    rows = list(names_per_row)
    if not rows:
        raise ValueError("names_per_row is empty; give one adapter name (or None) per batch row")
    require_adapters(model, [n for n in dict.fromkeys(rows) if n is not None])
    modules = list(adapter_modules(model))  # one walk of the model: a decode loop enters per step
    merged = list(dict.fromkeys(n for m in modules for n in getattr(m, "merged_adapters", ())))
    if merged:
        raise AdapterStateError(
            f"adapter_batch needs unmerged adapters, but {merged} are merged; call lorakit.unmerge(model) first"
        )
    # A serving pool's routing comes back after the block.
    with _set_within(modules, "row_adapters", RowRouting(rows)):
        yield model


@contextmanager
def _set_within(modules, attribute: str, value) -> Iterator[None]:
    """Set ``attribute`` of every module to ``value`` for the block, then give each its own back."""
    modules = list(modules)
    before = [getattr(module, attribute) for module in modules]
    for module in modules:
        setattr(module, attribute, value)
    try:
        yield
    finally:
        for module, was in zip(modules, before):
            setattr(module, attribute, was)


def merge(
    model: nn.Module, names: str | Sequence[str] | None = None, *, final: bool = False, requantize: bool = False
) -> dict[str, dict[str, float]] | None:
    """Write the change of the given adapters (default: the active ones) into the base weights:
    ``s B A`` for LoRA, ``m / ||W0 + s B A|| (W0 + s B A) - W0`` for DoRA, each against the
    original W0 (see ``LoraLayer.merge``).

    Merged adapters cost nothing at inference; ``unmerge`` takes them out again. Raises
    AdapterStateError before any weight is written when a DoRA merge would leave a layer's original
    weight unrecoverable (``LoraLayer.check_merge``), unless ``final``: the adapters are removed
    next (``unload``), so the original weight is not needed again.

    Quantized (bitsandbytes) layers: a merge would write W0 + the update back in 4 or 8 bits,
    which rounds most of a typical update away, so it is refused (the message gives the share that
    would survive) unless ``requantize``: then each such layer computes with the requantized sum
    (its original weight kept, for ``unmerge``), and the call returns, per adapter, each quantized
    module's share of the update that survived (⟨kept, change⟩ / ‖change‖², 1 = all of it; see
    ``LoraQuantizedLinear.surviving_share``). ``unload(model, merge=True)`` merges exactly instead,
    into dense layers. Without quantized layers the call returns None.
    """
    if names is None:
        names = active_adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    require_adapters(model, names)
    merged = merged_adapters(model)
    already = [n for n in names if n in merged]
    if already:
        raise AdapterStateError(f"adapter(s) {already} are already merged; call lorakit.unmerge(model) first")
    layers = list(lora_layers(model))
    for path, layer in layers if not final else ():
        try:
            if not (requantize and layer.quantized):
                layer.check_merge(names)
        except AdapterStateError as error:
            raise AdapterStateError(f"module {path!r}: {error}") from None
    report: dict[str, dict[str, float]] = {}
    for path, layer in layers:
        for name in names:
            if name not in layer.lora_A:
                continue
            if requantize and layer.quantized and not final:
                report.setdefault(name, {})[path] = layer.merge_requantized(name)
            else:
                layer.merge(name, final=final)
    for name, shares in report.items():
        values = sorted(shares.values())
        log.info(
            "adapter %r merged into %d quantized modules: median share of the update kept %.1f%% (min %.1f%%)",
            name,
            len(values),
            100 * values[len(values) // 2],
            100 * values[0],
        )
    return report or None


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again.

    Each change was taken against the original W0, so any order gives the same weights; the latest
    merged go first because the states passed through are then those merging passed through,
    which ``merge`` checked (several DoRA adapters must not scale W0 by about 0)."""
    for _, layer in lora_layers(model):
        for name in reversed(list(layer.merged_adapters)):
            layer.unmerge(name)


def set_fast_path(model: nn.Module, enabled: bool = True) -> None:
    """Use the fused LoRA/DoRA computations (the default) or force every layer's reference forward.

    Both give the same values (see ``lorakit/kernels``); the reference path is the plain formula,
    kept for debugging, for comparison, and as the fallback the fused path uses itself whenever it
    does not apply (several active adapters, per-row routing, VeRA, quantized bases, ...)."""
    for _, layer in lora_layers(model):
        if hasattr(layer, "fast_path"):
            layer.fast_path = bool(enabled)
