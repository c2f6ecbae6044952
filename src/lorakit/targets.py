"""Which modules of a model an adapter applies to.

``target_modules`` forms (PEFT's semantics):
- a list of names: a module matches when its full name equals an entry or ends with ``.entry``;
- a string: a regular expression that must match the whole module name;
- ``"all-linear"``: every linear layer (``nn.Linear`` and transformers' ``Conv1D``) except the
  model's output head (``get_output_embeddings()``, or a module named ``lm_head``).
``exclude_modules`` removes matches in the same forms; ``layers_to_transform`` keeps only modules
inside the given layer indices of the model's layer list (``model.layers.3...``, ``h.3...``).

A new adapter's lists are checked name by name (``check_listed_names``): PEFT raises only when a
whole list matches nothing, so a typo beside a valid name (``["qproj", "v_proj"]``) trained less than
asked. Loads are not checked this way: PEFT files list target kinds generously, and their weights
decide what is adapted.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import TargetError
from .layers import LoraLayer, ModulesToSave, is_conv1d, lora_class_for
from .layers.parameter import LoraParameter

_DEFAULT_LAYER_LISTS = ("layers", "h", "block", "blocks", "layer")

log = logging.getLogger("lorakit.targets")


def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without lorakit's own internals (inside LoRA layers and saved copies)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def matches(patterns: list[str] | str, module_name: str) -> bool:
    """Whether ``module_name`` is selected by a list of names/suffixes or by a regex string."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def exact_targets(model: nn.Module, paths: list[str]) -> list[str] | str:
    """A ``target_modules`` value that selects exactly the modules ``paths`` of ``model``.

    The plain list of paths when suffix matching picks no other module; else an anchored regex
    ``^(?:fc|layers\\.0\\.q_proj)$``, since a listed top-level ``fc`` also selects ``block.fc``.
    PEFT reads a string as a full-match regex too, so every loader adapts the same modules.
    """
    chosen = set(paths)
    for name, _ in named_base_modules(model):
        parts = name.split(".")
        if name not in chosen and any(".".join(parts[i:]) in chosen for i in range(1, len(parts))):
            return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
    return list(paths)


def exact_pattern(values: dict[str, Any], adapted: Iterable[str]) -> dict[str, Any]:
    """Per-module values (``rank_pattern`` / ``alpha_pattern``) keyed by full path, made exact.

    Loaders read a key as the regex ``(.*\\.)?key`` and PEFT takes the first key that matches, so
    a key that also matches another of the ``adapted`` modules (``fc`` and ``block.fc``) is
    written anchored, ``^fc$``, which matches only itself in lorakit and in PEFT.
    """
    adapted = list(adapted)
    out = {}
    for path, value in values.items():
        key = re.compile(rf"(.*\.)?(?:{path})")
        clash = any(other != path and key.fullmatch(other) for other in adapted)
        out["^" + re.escape(path) + "$" if clash else path] = value
    return out


def low_rank_config(ranks: dict[str, int], template: LoraConfig, **changes: Any) -> LoraConfig:
    """A plain LoRA config for per-module ranks with scaling 1 everywhere (alpha = r).

    The most common rank becomes ``r``; the others go to ``rank_pattern`` / ``alpha_pattern``
    keyed by full module path (anchored where a path would also match another module, see
    ``exact_pattern``), which PEFT's loader reads the same way."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = exact_pattern({path: r for path, r in ranks.items() if r != common}, ranks)
    values = dict(
        r=common,
        alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        variant="lora",
        init="default",
        dropout=0.0,
    )
    return template.replace(**{**values, **changes})


def layer_index(module_name: str, layers_pattern: list[str] | None) -> int | None:
    """The index in the model's layer list that ``module_name`` sits in (None if none)."""
    for pattern in layers_pattern or _DEFAULT_LAYER_LISTS:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", module_name)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head, which ``all-linear`` leaves alone."""
    names = {name for name, _ in model.named_modules() if name == "lm_head" or name.endswith(".lm_head")}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        names |= {name for name, module in model.named_modules() if module is head}
    return names


def is_linear(module: nn.Module) -> bool:
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return isinstance(base, nn.Linear) or is_conv1d(base)


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``config`` adapts, in model order; raises TargetError when none
    match or when a matched module is of a type LoRA cannot adapt."""
    targets = config.target_modules
    saved = config.modules_to_save or []
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in named_base_modules(model):
        if not name:
            continue
        if targets == ALL_LINEAR:
            if not is_linear(module) or name in heads or matches(saved, name):
                continue
        elif not matches(targets, name):
            continue
        if config.exclude_modules is not None and matches(config.exclude_modules, name):
            continue
        if config.layers_to_transform is not None:
            if layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        if not isinstance(module, LoraLayer) and lora_class_for(module) is None:
            raise TargetError(
                f"module {name!r} is a {type(module).__name__}, which LoRA cannot adapt "
                f"(supported: Linear, Embedding, Conv1d/2d/3d, transformers Conv1D); "
                f"target its layers instead{_suggest_inside(model, name)}"
            )
        chosen.append((name, module))
    if not chosen:
        raise TargetError(_no_match_message(model, config))
    return chosen


def check_listed_names(model: nn.Module, config: LoraConfig) -> None:
    """Refuse a new adapter whose ``target_modules``, ``modules_to_save`` or ``target_parameters``
    list has an entry naming nothing in ``model``; warn about such ``exclude_modules`` entries.

    An entry counts when it names a module (a parameter) at all, before ``exclude_modules`` and
    ``layers_to_transform`` filter: an entry whose modules those remove is not a typo. An exclude
    entry that names nothing excludes nothing, which is harmless and common (generic exclude lists
    copied between models, as PEFT users do), so it gets a warning, as in PEFT, not an error.
    """
    modules = [name for name, _ in named_base_modules(model) if name]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
    adaptable = _adaptable_leaf_names(model)
    for field_name, names, candidates, kind in (
        ("target_modules", config.target_modules, adaptable, "adaptable module names"),
        ("modules_to_save", config.modules_to_save, leaves, "module names"),
    ):
        if isinstance(names, list):
            missing = [e for e in names if not any(matches([e], n) for n in modules)]
            if missing:
                raise TargetError(_unmatched_message(field_name, names, missing, candidates, kind, "module"))
    if config.target_parameters:
        params = _parameter_names(model)
        missing = [t for t in config.target_parameters if not any(p == t or p.endswith("." + t) for p in params)]
        if missing:
            short = sorted({".".join(p.split(".")[-2:]) for p in params})
            stacks = stacked_parameters(model)
            raise TargetError(
                _unmatched_message("target_parameters", config.target_parameters, missing, short, None, "parameter")
                + (f"; stacked parameters in this model: {', '.join(stacks)}" if stacks else "")
            )
    excludes = config.exclude_modules
    for entry in [excludes] if isinstance(excludes, str) else excludes or []:
        if not any(matches(excludes if isinstance(excludes, str) else [entry], n) for n in modules):
            hint = _did_you_mean(entry, leaves) if isinstance(excludes, list) else ""
            log.warning("exclude_modules entry %r matches no module of this model, so excludes nothing%s", entry, hint)


def _parameter_names(model: nn.Module) -> list[str]:
    """Full names of the model's own parameters, as before any adapter wrapped their modules
    (tied weights under each of their names)."""
    names = []
    for key, _ in model.named_parameters(remove_duplicate=False):
        if ".lora_" not in key and ".modules_to_save." not in key:
            names.append(re.sub(r"\.(?:base_layer|original_module)(?=\.)", "", key))
    return names


def _did_you_mean(entry: str, candidates: list[str], parts: int = 1) -> str:
    """`` (did you mean 'q_proj'?)`` for the candidates close to the entry's last ``parts`` name parts."""
    close = difflib.get_close_matches(".".join(entry.split(".")[-parts:]), candidates, n=3)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _unmatched_message(
    field_name: str, names: list[str], missing: list[str], candidates: list[str], kind: str | None, what: str
) -> str:
    parts = 2 if what == "parameter" else 1  # parameters are suggested as "<module>.<parameter>"
    entries = ", ".join(f"{e!r}{_did_you_mean(e, candidates, parts)}" for e in missing)
    listing = f"; {kind} in this model: {', '.join(candidates) or 'none'}" if kind else ""
    return (
        f"no {what} matched {entries} in {field_name}={names!r}; every listed name must match a {what} "
        f"(fix or remove it){listing}"
    )


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, list[str]]]:
    """(module name, module, parameter names) for ``config.target_parameters``, in model order.

    A parameter ``p`` of module ``m`` is chosen when ``"m.p"`` equals an entry or ends with
    ``"." + entry`` (PEFT's rule). Names are listed in the order the module registered them, which
    is the order PEFT nests its wrappers in (the first innermost). The module is the one in the
    model: an existing ``LoraParameter`` nest or the plain module. Raises TargetError when nothing
    matches."""
    wanted = config.target_parameters or []
    chosen = []
    for name, module in named_base_modules(model):
        owner = module.owner if isinstance(module, LoraParameter) else module
        if not name or isinstance(owner, (LoraLayer, ModulesToSave)):  # the model itself cannot be wrapped
            continue
        params = [
            p
            for p, _ in owner.named_parameters(recurse=False)
            if any(f"{name}.{p}" == t or f"{name}.{p}".endswith("." + t) for t in wanted)
        ]
        if params:
            chosen.append((name, module, params))
    if not chosen:
        found = stacked_parameters(model)
        hint = f" (stacked parameters in this model: {', '.join(found)})" if found else ""
        raise TargetError(
            f"no parameter matched target_parameters={wanted!r}; give '<module>.<parameter>' names or suffixes{hint}"
        )
    return chosen


def nested_path(module_path: str, params: list[str], param: str) -> str:
    """Where the ``LoraParameter`` for ``param`` sits when a module's targeted ``params`` (in the
    module's registration order) nest, the first innermost: PEFT's nesting, hence its file keys."""
    return module_path + ".base_layer" * (len(params) - 1 - params.index(param))


def stacked_parameters(model: nn.Module) -> list[str]:
    """``"<module>.<parameter>"`` names (the module's last name part) of the 3-D parameters of
    modules LoRA does not wrap as layers: mixture-of-experts stacks, which only
    ``target_parameters`` reaches (a Conv1d's 3-D kernel is a layer's, and not listed)."""
    return sorted(
        {
            f"{name.rsplit('.', 1)[-1]}.{param}"
            for name, module in named_base_modules(model)
            if name and not isinstance(module, (LoraLayer, ModulesToSave)) and lora_class_for(module) is None
            for param, value in module.named_parameters(recurse=False)
            if value.dim() == 3
        }
    )


def _adaptable_leaf_names(model: nn.Module) -> list[str]:
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in named_base_modules(model)
            if name and (isinstance(module, LoraLayer) or lora_class_for(module) is not None)
        }
    )


def _suggest_inside(model: nn.Module, name: str) -> str:
    inner = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in named_base_modules(model)
            if n.startswith(name + ".") and lora_class_for(m) is not None
        }
    )
    return f", e.g. {inner}" if inner else ""


def _no_match_message(model: nn.Module, config: LoraConfig) -> str:
    candidates = _adaptable_leaf_names(model)
    targets = config.target_modules
    wanted = [targets] if isinstance(targets, str) else targets
    hints = []
    for target in wanted:
        close = difflib.get_close_matches(target.rsplit(".", 1)[-1], candidates, n=3)
        if close:
            hints.append(f"for {target!r} did you mean {' or '.join(repr(c) for c in close)}?")
    filters = []
    if config.exclude_modules is not None:
        filters.append(f"exclude_modules={config.exclude_modules!r}")
    if config.layers_to_transform is not None:
        filters.append(f"layers_to_transform={config.layers_to_transform!r}")
    return (
        f"no module matched target_modules={targets!r}"
        + (f" (after {', '.join(filters)})" if filters else "")
        + (f"; {' '.join(hints)}" if hints else "")
        + f"; adaptable module names in this model: {', '.join(candidates) or 'none'}"
    )
