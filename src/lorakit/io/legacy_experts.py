"""Adapters trained on transformers 4's per-expert layers, read onto transformers 5's expert stacks.

transformers 4 kept every expert as linear layers of its own (Mixtral's
``block_sparse_moe.experts.3.w1``, Qwen-MoE's ``mlp.experts.3.gate_proj``); transformers 5 stacks
them into parameters (``mlp.experts.gate_up_proj`` of shape (E, 2I, H): w1 and w3 of every expert,
concatenated along the output). PEFT files of the first layout hold an (A, B) per expert layer.
transformers says how its own checkpoints move (``conversion_mapping``): renamings, and converters
that stack the experts' weights (and concatenate several along the output). The same moves,
applied to each expert's update, give the stack's update, which is low-rank again:

    [s1 B1 A1; s2 B2 A2] = blockdiag(s1 B1, s2 B2) · [A1; A2]        rank r1 + r2, per expert

so the file becomes a ``target_parameters`` adapter (``layers/parameter.py``) of rank r1 + r2 on
each stack, exactly, the scalings folded into B (alpha = rank: s = 1). A renamed module that is no
linear layer any more (Mixtral's router ``gate``) gets its 2-D ``weight`` as a parameter target.
Converters with other operations (transposes, splits) are left alone, and the load then says which
modules it could not place.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError
from ..init_names import changes_base
from ..kernels.casting import accumulation_dtype
from ..layers import lora_class_for
from ..layers.parameter import LoraParameter
from ..targets import low_rank_config, named_base_modules, nested_path
from .layout import PREFIX, factor_suffixes, group_factors, split_factor_key, strip_prefix

log = logging.getLogger("lorakit.io")

# The converters read here: experts stacked along a new dim 0, then (for several source layers)
# concatenated along the output, dim 1 of the stack.
STACK, CONCATENATE = [("MergeModulelist", 0)], [("Concatenate", 1)]


def convert_legacy_experts(
    model: nn.Module, config: LoraConfig, weights: dict[str, torch.Tensor], source: str
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """``(config, weights)`` as they apply to ``model``: unchanged unless the file has factors for
    modules the model lacks and the model's transformers conversion mapping places them. Raises
    AdapterFileError when it places them on something they do not fit."""
    # Only plain factors convert: a variant with tensors of its own in files (DoRA, VeRA) is read as it is.
    if config.variant_object.file_suffixes or config.target_parameters or changes_base(config.init):
        return config, weights  # read as they are, or refused by the load
    modules = dict(named_base_modules(model))
    factors, _ = group_factors(weights)
    if all(path in modules for path in factors):
        return config, weights
    renamings, converters = _conversion_rules(model)
    stacks: dict[str, dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    sources_of: dict[str, int] = {}
    plain: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    moved = False
    for path, found in factors.items():
        if "lora_A" not in found or "lora_B" not in found:
            return config, weights  # incomplete: the load names what is missing
        acc = accumulation_dtype(found["lora_B"].dtype)  # s folded into B: one rounding, in fp32 or wider
        pair = (found["lora_A"].to(acc), found["lora_B"].to(acc) * config.scaling_for(path))
        new_path = _renamed(path, renamings)
        moved |= new_path != path
        placed = _stack_of(new_path, converters)
        if placed is None:
            plain[new_path] = pair
        else:
            key, index, expert, count = placed
            stacks.setdefault(key, {}).setdefault(index, {})[expert] = pair
            sources_of[key] = count
    targets = {key: _stacked_factors(modules, key, parts, sources_of[key]) for key, parts in stacks.items()}
    for path, pair in list(plain.items()):
        module = modules.get(path)
        weight = getattr(module, "weight", None)
        if module is not None and lora_class_for(module) is None and isinstance(weight, nn.Parameter):
            targets[f"{path}.weight"] = plain.pop(path)  # a renamed layer that is now a bare 2-D weight
    if not targets and not moved:  # nothing transformers moves: the load says which modules are missing
        return config, weights
    suffixes = factor_suffixes()
    out = {k: v for k, v in weights.items() if split_factor_key(strip_prefix(k), suffixes) is None}
    for path, (A, B) in {**plain, **_nest_paths(modules, targets)}.items():
        out[PREFIX + path + ".lora_A.weight"], out[PREFIX + path + ".lora_B.weight"] = A, B
    ranks = {path: A.shape[0] for path, (A, _) in plain.items()}
    ranks.update({key: A.shape[0] // _experts(modules, key) for key, (A, _) in targets.items()})
    converted = low_rank_config(
        ranks,
        config,
        target_modules=sorted(plain) or None,
        target_parameters=sorted(targets) or None,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    log.info("%s: layers of transformers 4 read onto this model (%d stacked or bare parameters)", source, len(targets))
    return converted, out


def _conversion_rules(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[list[re.Pattern], str]]]:
    """transformers' renamings and stacking converters for ``model``'s type (empty when none)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: no stacked experts to read onto
        return [], []
    rules = (get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
    renamings, converters = [], []
    for rule in rules:
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        operations = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(rule, "operations", [])]
        if type(rule).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1:
            renamings.append((sources[0], targets[0]))
        elif operations in (STACK, STACK + CONCATENATE) and len(targets) == 1:
            patterns = [re.compile(r"(?:^|(?<=\.))" + _expert_pattern(s) + "$") for s in sources]
            converters.append((patterns, targets[0].lstrip(".")))
    return renamings, converters


def _expert_pattern(source: str) -> str:
    """transformers' ``.experts.*.w1.weight`` as a regex over module paths, the expert index captured."""
    return re.escape(source.removesuffix(".weight").lstrip(".")).replace(r"\*", r"(\d+)")


def _renamed(path: str, renamings: list[tuple[str, str]]) -> str:
    dotted = "." + path + "."
    for old, new in renamings:
        dotted = dotted.replace(old, new)
    return dotted[1:-1]


def _stack_of(path: str, converters) -> tuple[str, int, int, int] | None:
    """("<module>.<parameter>" of the stack, source index, expert, number of sources) of an
    expert's layer; None for any other module."""
    for patterns, target in converters:
        for index, pattern in enumerate(patterns):
            match = pattern.search(path)
            if match:
                return path[: match.start()] + target, index, int(match.group(1)), len(patterns)
    return None


def _stacked_factors(
    modules: dict[str, nn.Module], key: str, parts: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]], count: int
):
    """(A (E·R, d_in), B (d_out, R·E)) of stack ``key`` from its experts' (A_k, s_k B_k), k the
    source layer (w1, w3...) in the converter's order, R = Σ r_k; an expert without source k gets a
    zero update from it."""
    module_path, _, param = key.rpartition(".")
    module = modules.get(module_path)
    weight = getattr(module, param, None) if module is not None else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or getattr(module, "is_transposed", False):
        raise AdapterFileError(
            f"the file's expert layers map onto {key}, which is no (experts, d_out, d_in) stack in this model"
        )
    experts, d_out, d_in = weight.shape
    first = {k: next(iter(parts[k].values())) for k in parts}
    if len(first) != count:
        raise AdapterFileError(f"{key}: the file has only some of the {count} layers stacked into it")
    ranks = [first[k][0].shape[0] for k in range(count)]
    outs = [first[k][1].shape[0] for k in range(count)]
    if (
        sum(outs) != d_out
        or any(first[k][0].shape[1] != d_in for k in range(count))
        or max(e for k in parts for e in parts[k]) >= experts
    ):
        raise AdapterFileError(
            f"{key}: the file's expert layers do not add up to the stack's shape {tuple(weight.shape)}"
        )
    rank = sum(ranks)
    dtype = first[0][0].dtype
    A = torch.zeros(experts, rank, d_in, dtype=dtype)
    B = torch.zeros(experts, d_out, rank, dtype=dtype)
    row = col = 0
    for k in range(count):
        for e, (A_k, B_k) in parts[k].items():
            A[e, col : col + ranks[k]] = A_k
            B[e, row : row + outs[k], col : col + ranks[k]] = B_k
        row, col = row + outs[k], col + ranks[k]
    # PEFT's layout (layers/parameter.py): expert e's rows of A at [e R, (e+1) R), B as (d_out, R, E).
    return A.reshape(experts * rank, d_in), B.permute(1, 2, 0).reshape(d_out, rank * experts)


def _experts(modules: dict[str, nn.Module], key: str) -> int:
    module_path, _, param = key.rpartition(".")
    weight = getattr(modules[module_path], param)
    return weight.shape[0] if weight.dim() == 3 else 1


def _nest_paths(modules: dict[str, nn.Module], targets: dict[str, tuple]) -> dict[str, tuple]:
    """The targets keyed by where PEFT's nesting puts their factors: the module's path plus one
    ``.base_layer`` per targeted parameter the module registered after this one."""
    out = {}
    for key, pair in targets.items():
        module_path, _, param = key.rpartition(".")
        module = modules[module_path]
        owner = module.owner if isinstance(module, LoraParameter) else module
        order = [p for p, _ in owner.named_parameters(recurse=False) if f"{module_path}.{p}" in targets]
        out[nested_path(module_path, order, param)] = pair
    return out
