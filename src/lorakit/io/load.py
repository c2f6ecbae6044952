"""`load_adapter`: read lorakit's and PEFT's adapter files into a model."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError, LorakitError
from ..init_names import UNCONVERTED_ADVICE, changes_base, pissa_iterations
from ..inject import InjectionPlan, commit, plan
from ..safe_files.journal import reading_folder
from ..state import adapter_configs
from .layout import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, group_factors, model_key_owners
from .legacy_experts import convert_legacy_experts
from .peft_adalora import as_lora, is_peft_adalora

log = logging.getLogger("lorakit.io")


def read_config_data(directory: Path) -> dict:
    """``directory``'s adapter_config.json as a dict (checked to be one)."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise AdapterFileError(f"{file} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{file} is not valid JSON ({exc}); the adapter directory is corrupt") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


def _config_from(data: dict, file: Path) -> LoraConfig:
    try:
        return LoraConfig.from_dict(data)
    except (LorakitError, TypeError) as exc:
        raise AdapterFileError(f"{file}: {exc}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``'s weights file, keyed as in the file."""
    safetensors_file, legacy_file = directory / WEIGHTS_NAME, directory / LEGACY_WEIGHTS_NAME
    if not safetensors_file.is_file() and not legacy_file.is_file():
        raise AdapterFileError(f"{directory} holds no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})")
    try:
        if safetensors_file.is_file():
            return load_file(str(safetensors_file))
        weights = torch.load(legacy_file, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise AdapterFileError(
            f"cannot read adapter weights in {directory}: {exc} (the file is corrupt or truncated)"
        ) from None
    # A .bin file is a pickle and may hold anything; the rest of lorakit needs a name -> tensor dict.
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise AdapterFileError(
            f"{legacy_file} does not hold a dict of named tensors (found {type(weights).__name__}); "
            "it is not an adapter weights file"
        )
    return weights


def read_adapter(directory: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and the weights of one save: both under the folder's shared lock, so a
    save into ``directory`` meanwhile cannot pair one save's config with another's weights (it waits).
    Leftovers of a save that was killed are recovered first (safe_files/journal.py). PEFT's
    AdaLoRA adapters come back as the LoRA adapters they compute (``peft_adalora.py``)."""
    with reading_folder(directory, (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)):
        data, weights = read_config_data(directory), read_weights(directory)
    if is_peft_adalora(data):
        return as_lora(data, weights, str(directory))
    return _config_from(data, directory / CONFIG_NAME), weights


def _fit_factors(model: nn.Module, planned: InjectionPlan, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put the file's A and B into the plan (checking shapes); return the keys left over."""
    factors, rest = group_factors(weights)
    planned_paths = {p.path for p in planned.layers}
    unexpected = sorted(set(factors) - planned_paths)
    if unexpected:
        raise AdapterFileError(
            f"the file has LoRA weights for modules the config does not target in this model: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; is this adapter for a different model?"
        )
    for p in planned.layers:
        found = factors.get(p.path, {})
        for factor, target in (("lora_A", p.A), ("lora_B", p.B)):
            if factor not in found:
                raise AdapterFileError(
                    f"the file has no {factor} weights for module {p.path!r}; the adapter is incomplete"
                )
            value = found[factor]
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterFileError(
                    f"{factor} of module {p.path!r} has shape {tuple(value.shape)} in the file but the model "
                    f"needs {tuple(target.shape)}; the adapter was trained for a different model or rank"
                )
        p.A = found["lora_A"].to(dtype=p.A.dtype, device=p.A.device)
        p.B = found["lora_B"].to(dtype=p.B.dtype, device=p.B.device)
        planned.config.variant_object.read_extras(p, found)
    return rest


def _fit_model_tensors(planned: InjectionPlan, weights: dict[str, torch.Tensor]) -> None:
    """Hand the file's once-per-adapter tensors (``Variant.model_keys``: VeRA's shared pair) to the
    config's variant; those of another variant mean the config and the weights disagree."""
    owners = model_key_owners()
    found = {key: weights.pop(key) for key in list(weights) if key in owners}
    if not found:
        return
    variant = planned.config.variant_object
    foreign = sorted(key for key in found if owners[key] != variant.name)
    if foreign:
        raise AdapterFileError(
            f"the file holds {[owners[k] for k in foreign][0]} tensors {foreign} but its config "
            f"is a {variant.name!r} config"
        )
    variant.read_model_tensors(planned, found)


def _normalized(key: str) -> str:
    """A tensor name with lorakit's/PEFT's wrapper levels removed (same before and after wrapping)."""
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _fit_other_tensors(
    model: nn.Module, planned: InjectionPlan, rest: dict[str, torch.Tensor]
) -> list[tuple[object, torch.Tensor]]:
    """Match the file's modules_to_save copies and trained biases to the model, checking shapes.

    Returns (target, value) pairs: a target is the model's own tensor (a trained bias) or a
    (module path, tensor name) pair for a modules_to_save copy that ``commit`` will create.
    """
    model_tensors = {
        _normalized(key): tensor
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]
        if ".lora_A." not in key and ".lora_B." not in key and ".modules_to_save." not in key
    }
    planned_paths = {p.path for p in planned.layers}
    fitted: list[tuple[object, torch.Tensor]] = []
    for key, value in rest.items():
        saved_path = next((p for p in planned.saved_paths if key.startswith(p + ".")), None)
        if saved_path is not None:
            inner = _normalized(key[len(saved_path) :])[1:]
            target: object = (saved_path, inner)
            existing = model_tensors.get(f"{saved_path}.{inner}")
        elif key.endswith(".base_layer.weight") and key[: -len(".base_layer.weight")] in planned_paths:
            # PEFT stores a whole embedding matrix next to embedding adapters; an adapter load
            # never replaces the base model's own weights.
            log.info("ignoring %s: lorakit leaves the base model's weights as they are", key)
            continue
        else:
            target = existing = model_tensors.get(_normalized(key))
        if existing is None:
            raise AdapterFileError(f"the file has tensor {key!r}, which matches nothing in this model")
        if tuple(existing.shape) != tuple(value.shape):
            raise AdapterFileError(
                f"tensor {key!r} has shape {tuple(value.shape)} in the file but the model has {tuple(existing.shape)}"
            )
        fitted.append((target, value))
    return fitted


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    trainable: bool = False,
    *,
    activate: bool = True,
) -> str:
    """Load the adapter in directory ``path`` (lorakit's or PEFT's files) as adapter ``name``.

    ``name`` defaults to ``"default"`` when free, else the directory's name. The adapter is
    frozen unless ``trainable``; with ``activate`` it becomes the only active adapter. Every check
    runs before the model is changed. Returns the adapter's name.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist")
    config, weights = read_adapter(directory)
    config, weights = convert_legacy_experts(model, config, weights, str(directory))
    rebuild_base = changes_base(config.init)
    if rebuild_base:
        _check_rebuildable(config, directory)
        log.info(
            "adapter in %s was saved by PEFT with init=%r before conversion: its weights belong to the base "
            "minus that init's part, which is recomputed from the model's weights",
            directory,
            config.init,
        )
    if name is None:
        name = "default" if "default" not in adapter_configs(model) else directory.resolve().name.replace(".", "_")
    planned = plan(model, config, name, draw_factors=rebuild_base)
    _fit_model_tensors(planned, weights)
    rest = _fit_factors(model, planned, weights)
    extras = _fit_other_tensors(model, planned, rest)
    commit(model, planned, trainable=trainable, activate=activate)
    _assign(model, name, extras)
    return name


def _check_rebuildable(config: LoraConfig, directory: Path) -> None:
    """A PiSSA/OLoRA file that PEFT saved unconverted holds A, B trained against the residual
    W0 - s B0 A0, with (A0, B0) from the init. PEFT recomputes that residual when loading; so does
    lorakit for the deterministic inits (exact SVD, QR). A randomized SVD's draw is not in the file
    (PEFT's own reload draws another), so such a file is refused rather than loaded slightly wrong.
    lorakit's own saves are always converted (init "default"), and never get here."""
    if pissa_iterations(config.init) is not None:
        raise AdapterFileError(
            f"{directory} was saved with init_lora_weights={config.init!r} before conversion: its weights belong to "
            f"the base minus a randomized SVD's part, which cannot be recomputed exactly; {UNCONVERTED_ADVICE}"
        )


@torch.no_grad()
def _assign(model: nn.Module, name: str, fitted: list[tuple[object, torch.Tensor]]) -> None:
    for target, value in fitted:
        if isinstance(target, tuple):
            path, inner = target
            target = model.get_submodule(path).modules_to_save[name].state_dict()[inner]
        target.copy_(value.to(target.dtype))
