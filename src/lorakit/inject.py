"""Adding and removing adapters: `add_adapter`, `delete_adapter`, `unload`.

Injection runs in two phases so that a failed call leaves the model as it was: ``plan`` finds the
targets, checks everything and builds the new layers and factors off to the side; ``commit`` then
attaches them, swaps the layers into the model, and freezes the base. Nothing in ``commit`` can
fail on user input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterNameError, AdapterStateError, TargetError
from .init_names import changes_base
from .initialization import initial_factors, module_generator
from .layers import LoraLayer, ModulesToSave, lora_class_for
from .layers.parameter import LoraParameter
from .layers.quantized import densify_all
from .patching import install_patches, remove_patches
from .quantization import is_quantized_parameter
from .state import (
    active_adapters,
    adapter_configs,
    adapter_modules,
    lora_layers,
    merged_adapters,
    replace_module,
    require_adapters,
    saved_modules,
)
from .targets import (
    check_listed_names,
    find_parameter_targets,
    find_targets,
    matches,
    named_base_modules,
    nested_path,
    stacked_parameters,
)

log = logging.getLogger("lorakit.inject")


@dataclass
class LayerPlan:
    """One module to adapt: the (new or existing) LoRA layer and the factors to attach."""

    path: str
    layer: LoraLayer
    is_new: bool
    scaling: float
    dropout: float
    A: torch.Tensor
    B: torch.Tensor
    # The variant's own planned state by name (DoRA's m read from a file, VeRA's shared pair):
    # filled by ``Variant.plan_adapter`` / ``Variant.read_extras``, used by ``Variant.attach``.
    extras: dict = field(default_factory=dict)
    # (A0, B0) of a PiSSA/OLoRA init: s B0 A0 leaves W0 at commit. A load keeps them when the file's
    # A and B replace the drawn ones (an unconverted PEFT file: see io/load.py).
    moved_from_base: tuple[torch.Tensor, torch.Tensor] | None = None
    nested: bool = False  # a new LoraParameter inside another new one: placed by its parent, not replaced


@dataclass
class InjectionPlan:
    name: str
    config: LoraConfig
    layers: list[LayerPlan] = field(default_factory=list)
    saved_paths: list[str] = field(default_factory=list)


def adapter_dtype(config: LoraConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype of A and B on a layer computing in ``dtype`` (a quantized layer: its compute
    dtype): see ``LoraConfig.adapter_dtype``."""
    if config.adapter_dtype != "auto":
        return getattr(torch, config.adapter_dtype)
    if not dtype.is_floating_point or dtype == torch.float16:
        return torch.float32
    return dtype


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterNameError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapter_configs(model):
        raise AdapterNameError(
            f"an adapter named {name!r} already exists; pick another name or delete_adapter(model, {name!r}) first"
        )


def plan(model: nn.Module, config: LoraConfig, name: str, draw_factors: bool = True) -> InjectionPlan:
    """Check everything and prepare the layers for adapter ``name``; the model is not touched."""
    check_new_name(model, name)
    variant = config.variant_object
    result = InjectionPlan(name=name, config=config)
    module_targets = find_targets(model, config) if config.target_modules is not None else []
    for path, module in module_targets:
        if isinstance(module, LoraParameter):
            raise TargetError(
                f"module {path!r} has adapters on its parameters (target_parameters); adapt it the same "
                "way (target_parameters) or target the layers inside it"
            )
        is_new = not isinstance(module, LoraLayer)
        layer = lora_class_for(module)(module) if is_new else module
        refusal = variant.refusal(layer)
        if refusal:
            raise TargetError(f"{refusal}; exclude {path!r} (exclude_modules)")
        if changes_base(config.init) and layer.quantized:
            raise TargetError(
                f"init={config.init!r} moves W0's principal part into the adapter and leaves a residual W0, which "
                f"cannot be written into the quantized weight of {path!r}; use the default init on a quantized "
                "model, or compute the PiSSA/OLoRA residual on the full-precision model and quantize that"
            )
        if changes_base(config.init) and layer.init_factors:
            raise TargetError(
                f"module {path!r} already carries an adapter with a base-changing init "
                f"({list(layer.init_factors)}); only one PiSSA/OLoRA adapter per layer is possible"
            )
        r = config.rank_for(path)
        scaling = config.scaling_for(path)
        A, B = _factors(
            layer, config, r, scaling, draw_factors and variant.draws_factors, module_generator(config.seed, path)
        )
        moved = (A, B) if draw_factors and changes_base(config.init) else None
        result.layers.append(LayerPlan(path, layer, is_new, scaling, config.dropout, A, B, moved_from_base=moved))
    if config.target_parameters:
        taken = {path for path, _ in module_targets}
        for path, module, params in find_parameter_targets(model, config):
            if path in taken:
                raise TargetError(
                    f"module {path!r} is matched by target_modules and by target_parameters; adapt it one way"
                )
            result.layers.extend(_plan_parameters(path, module, params, config, draw_factors))
    variant.plan_adapter(result, config)  # variants that size shared state from every layer (VeRA)
    result.saved_paths = _modules_to_save_paths(model, config)
    return result


def _plan_parameters(
    path: str, module: nn.Module, params: list[str], config: LoraConfig, draw_factors: bool
) -> list[LayerPlan]:
    """The nest of ``LoraParameter`` wrappers for ``params`` of the module at ``path``: built new
    (first parameter innermost, at ``path.base_layer...``, where PEFT's files have it) or the
    existing one, which must adapt the same parameters (PEFT's rule)."""
    quantized = [p for p in params if is_quantized_parameter(getattr(module, p, None))]
    if quantized:
        raise TargetError(
            f"parameters {quantized} of module {path!r} are quantized (bitsandbytes), and target_parameters adapts "
            "a parameter by rebuilding it dense in every forward; target the module itself (target_modules)"
        )
    if isinstance(module, LoraParameter):
        nest, layer = [], module
        while isinstance(layer, LoraParameter):
            nest.insert(0, layer)
            layer = layer.base_layer
        if [w.parameter_name for w in nest] != params:
            raise TargetError(
                f"module {path!r} has adapters on parameters {[w.parameter_name for w in nest]}; every "
                f"adapter must target the same parameters of a module (this one: {params})"
            )
        is_new = False
    else:
        nest, layer = [], module
        for param in params:
            layer = LoraParameter(layer, param)
            nest.append(layer)
        is_new = True
    plans = []
    for layer in nest:
        key = f"{path}.{layer.parameter_name}"  # rank_pattern / alpha_pattern keys name the parameter
        A, B = _factors(
            layer,
            config,
            config.rank_for(key),
            config.scaling_for(key),
            draw_factors,
            module_generator(config.seed, key),
        )
        plans.append(
            LayerPlan(
                nested_path(path, params, layer.parameter_name),
                layer,
                is_new,
                config.scaling_for(key),
                0.0,
                A,
                B,
                nested=layer is not nest[-1],
            )
        )
    return plans


def _factors(
    layer: LoraLayer, config: LoraConfig, r: int, scaling: float, draw: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial (A, B) of a planned layer: drawn by ``config.init``, or zeros for a load to fill."""
    dtype = adapter_dtype(config, layer.compute_dtype)
    device = layer.base_weight.device
    own = config.variant_object.own_factors(layer, r, generator) if draw and device.type != "meta" else None
    if own is not None:
        return tuple(t.to(device=device, dtype=dtype).contiguous() for t in own)
    if draw:
        return initial_factors(layer, r, scaling, config.init, dtype, generator)
    shape_a, shape_b = layer.adapter_shapes(r)
    return torch.zeros(shape_a, dtype=dtype, device=device), torch.zeros(shape_b, dtype=dtype, device=device)


def _modules_to_save_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    found = [n for n, _ in named_base_modules(model) if n and matches(config.modules_to_save, n)]
    # A wrapper's original is reached through the wrapper's own name, so keep outermost matches.
    paths = [p for p in found if not any(p.startswith(q + ".") for q in found)]
    if not paths:
        raise TargetError(f"no module matched modules_to_save={config.modules_to_save!r}")
    adapted = [p for p in paths if isinstance(model.get_submodule(p), LoraLayer)]
    if adapted:
        raise TargetError(f"modules {adapted} carry LoRA layers and cannot also be in modules_to_save")
    return paths


def commit(model: nn.Module, planned: InjectionPlan, trainable: bool = True, activate: bool = True) -> None:
    """Attach the planned adapter to the model (in place) and freeze everything else."""
    name, config = planned.name, planned.config
    variant = config.variant_object
    current = active_adapters(model)
    for p in planned.layers:
        if p.is_new:  # new modules start in training mode: follow the module they wrap
            p.layer.train(p.layer.base_layer.training)
        p.layer.add_adapter(
            name, p.A, p.B, p.scaling, p.dropout, trainable=trainable, rslora=config.use_rslora, variant=variant
        )
        if p.moved_from_base is not None:
            # W0 keeps the residual W0 - s B0 A0; (A0, B0) are kept to express the update against
            # the original W0 when saving or removing the adapter.
            A0, B0 = (t.detach().clone() for t in p.moved_from_base)
            p.layer.add_to_weight(-p.layer.dense_update(A0.float(), B0.float(), p.scaling))
            p.layer.init_factors[name] = (A0, B0)
        # After the residual moved: a variant's state (DoRA's m = ||W0 + s B A||) is of the new W0.
        variant.attach(p.layer, name, p, trainable)
        if p.is_new:
            p.layer.active_adapters = list(current)
            if not p.nested:
                replace_module(model, p.path, p.layer)
    for path in planned.saved_paths:
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper).train(wrapper.training)
            wrapper.active_adapters = list(current)
            replace_module(model, path, wrapper)
        wrapper.add_adapter(name, trainable=trainable)
    adapter_configs(model)[name] = config
    freeze_base(model)
    if activate:
        for module in adapter_modules(model):
            module.active_adapters = [name]
    install_patches(model)  # gated MLPs and attention's q, k, v in one fused call each: see patching/


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter's, except the biases configs ask to train."""
    adapter_params = set()
    for module in adapter_modules(model):
        if isinstance(module, LoraLayer):
            for name, variant in module.variants.items():
                adapter_params.update(map(id, variant.trained_tensors(module, name)))
        else:
            adapter_params.update(map(id, module.modules_to_save.parameters()))
    trained_biases = trained_bias_ids(model)
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(id(param) in trained_biases)


def trained_bias_ids(model: nn.Module) -> set[int]:
    rules = {config.bias for config in adapter_configs(model).values()}
    ids: set[int] = set()
    if "all" in rules:
        for module in model.modules():
            if isinstance(module, ModulesToSave):
                continue
            bias = module._parameters.get("bias")
            if bias is not None:
                ids.add(id(bias))
    if "lora_only" in rules:
        for _, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                ids.add(id(bias))
    return ids


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Inject a new adapter ``name`` described by ``config`` into ``model`` (in place).

    The adapter's parameters are trainable, the base model's frozen (biases and
    ``modules_to_save`` as the config says). With ``activate`` (the default) the new adapter
    becomes the only active one. Every name listed in ``target_modules``, ``modules_to_save`` and
    ``target_parameters`` must match something in the model (``targets.check_listed_names``).
    Returns the same model object.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    if config.base_model_name_or_path is None:
        config = config.replace(base_model_name_or_path=_model_name(model))
    check_new_name(model, name)
    check_listed_names(model, config)
    commit(model, plan(model, config, name), trainable=True, activate=activate)
    _warn_about_frozen_experts(model, config)
    log.info("added adapter %r to %d modules", name, sum(1 for _, l in lora_layers(model) if name in l.lora_A))
    return model


def _warn_about_frozen_experts(model: nn.Module, config: LoraConfig) -> None:
    """ "all-linear" on a mixture-of-experts model whose experts are stacked parameters (transformers
    5) adapts attention only: say so, since the same flag used to cover every expert's layers."""
    if config.target_modules != ALL_LINEAR:
        return
    stacks = stacked_parameters(model)
    if stacks:
        log.warning(
            "all-linear adapts linear layers only; this model's stacked expert weights (%s) stay frozen. "
            "Add target_parameters=%s (CLI: --target-parameters %s) to train the experts too",
            ", ".join(stacks),
            stacks,
            ",".join(stacks),
        )


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def _restore_residual(layer: LoraLayer, name: str) -> None:
    """Give back to W0 the part a PiSSA/OLoRA init moved into the adapter (if not merged)."""
    if name in layer.init_factors and name not in layer.merged_adapters:
        A0, B0 = layer.init_factors[name]  # only LoraLinear takes base-changing inits
        layer.add_to_weight(layer.dense_update(A0.float(), B0.float(), layer.scaling[name]))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters become their base layers again."""
    require_adapters(model, [name])
    if name in merged_adapters(model):
        raise AdapterStateError(f"adapter {name!r} is merged into the weights; call lorakit.unmerge(model) first")
    # Innermost first: a nested LoraParameter's path runs through the wrapper around it.
    for path, layer in reversed(list(lora_layers(model))):
        if name in layer.lora_A:
            _restore_residual(layer, name)
            layer.remove_adapter(name)
            if not layer.adapter_names and layer.__dict__.get("slot_stack") is None:  # a serving pool's stays
                replace_module(model, path, layer.base_layer)
    for path, wrapper in list(saved_modules(model)):
        if name in wrapper.modules_to_save:
            wrapper.remove_adapter(name)
            if not wrapper.adapter_names:
                replace_module(model, path, wrapper.original_module)
    del adapter_configs(model)[name]
    freeze_base(model)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every LoRA module and return the plain model (same object).

    With ``merge`` the active adapters are merged first (and ``modules_to_save`` keep the active
    adapter's trained copy), so the plain model computes what the adapted one did; without it the
    original base model comes back (PiSSA/OLoRA residuals restored).

    Quantized (bitsandbytes) layers carrying adapters become, with ``merge``, dense ``nn.Linear``s
    in their compute dtype holding the dequantized W0 with the adapters merged exactly (see
    ``LoraQuantizedLinear.densify``); linear layers without adapters stay as they are
    (``lorakit.dequantize`` makes every one dense). Without ``merge`` the quantized layers come
    back, their original packed weights bit for bit.
    """
    if merge:
        from .control import merge as merge_adapters

        densify_all(lora_layers(model))  # exact merges, into dense weights

        pending = [n for n in active_adapters(model) if n in adapter_configs(model)]
        merged = merged_adapters(model)
        merge_adapters(model, [n for n in pending if n not in merged], final=True)  # W0 is not needed again
    for path, layer in reversed(list(lora_layers(model))):  # innermost first, as in delete_adapter
        for name in list(reversed(layer.merged_adapters)) if not merge else []:  # latest first, as unmerge() does
            layer.unmerge(name)
        for name in layer.adapter_names:
            _restore_residual(layer, name)
        replace_module(model, path, layer.base_layer)
    for path, wrapper in list(saved_modules(model)):
        replace_module(model, path, wrapper.current() if merge else wrapper.original_module)
    remove_patches(model)
    adapter_configs(model).clear()
    return model
