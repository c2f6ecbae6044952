"""`save_adapter`: write one adapter as PEFT does, all or nothing."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterFileError
from ..inject import trained_bias_ids
from ..layers import LoraLayer
from ..safe_files.atomic import replace_files_in_folder
from ..state import adapter_configs, lora_layers, require_adapters, saved_modules
from ..targets import exact_targets
from .layout import CONFIG_NAME, LEGACY_WEIGHTS_NAME, PREFIX, WEIGHTS_NAME, task_type_of


def adapter_state_dict(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The tensors and config that describe adapter ``name`` in PEFT's layout.

    A regex or ``"all-linear"`` combined with ``layers_to_transform`` (which PEFT refuses) is
    written as the adapted modules' exact paths (``exact_targets``: a list, or an anchored regex
    where a listed name would also select another module). The variant says what its file holds
    (``Variant.saved_factors`` / ``saved_extras`` / ``saved_config`` / ``model_tensors``): AdaLoRA
    adapters, for one, are written as plain LoRA with the ranks left per module.

    PiSSA/OLoRA adapters are written against the *original* W0: the update since init,
    ``s (B A - B0 A0)``, is stored exactly as a rank-2r adapter ``[B, -B0] [A; A0]`` with alpha
    doubled (×√2 with rsLoRA) so the scaling stays the same, and the config says plain init.
    """
    require_adapters(model, [name])
    config = adapter_configs(model)[name]
    tensors: dict[str, torch.Tensor] = {}
    converted = False
    paths, layers = [], []
    variant = config.variant_object
    saved_ranks: dict[str, int] = {}
    for path, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        paths.append(path)
        layers.append(layer)
        A, B, rank = variant.saved_factors(layer, name)
        if rank is not None:
            saved_ranks[path] = rank
        if name in layer.init_factors:
            A0, B0 = layer.init_factors[name]
            A, B = torch.cat([A, A0.to(A)], dim=0), torch.cat([B, -B0.to(B)], dim=1)
            converted = True
        tensors[PREFIX + path + "." + layer.peft_key(name, "lora_A")] = A
        tensors[PREFIX + path + "." + layer.peft_key(name, "lora_B")] = B
        for slot, value in variant.saved_extras(layer, name).items():
            tensors[PREFIX + path + "." + layer.peft_key(name, slot)] = value
    for path, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                tensors[PREFIX + path + "." + key] = value
    tensors.update(_trained_biases(model, config))
    tensors.update(variant.model_tensors(layers, name, config))
    fan_in_fan_out = any(
        getattr(layer, "fan_in_fan_out", False) for _, layer in lora_layers(model) if name in layer.lora_A
    )
    config = config.replace(fan_in_fan_out=fan_in_fan_out, task_type=config.task_type or task_type_of(model))
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        # PEFT refuses a regex/"all-linear" together with layers_to_transform: write the exact
        # modules instead, which selects the same modules in every loader.
        config = config.replace(
            target_modules=exact_targets(model, paths),
            layers_to_transform=None,
            layers_pattern=None,
            exclude_modules=None,
        )
    config = variant.saved_config(config, saved_ranks, paths)
    if converted:
        growth = math.sqrt(2) if config.use_rslora else 2
        config = config.replace(
            init="default",
            r=2 * config.r,
            alpha=config.alpha * growth,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: v * growth for k, v in config.alpha_pattern.items()},
        )
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, config


def _trained_biases(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    if config.bias == "none":
        return {}
    wanted = trained_bias_ids(model)
    out = {}
    for key, param in model.named_parameters():
        if id(param) in wanted and ("lora_only" != config.bias or _in_lora_layer(model, key)):
            out[PREFIX + key] = param
    return out


def _in_lora_layer(model: nn.Module, key: str) -> bool:
    parent = key.rsplit(".", 2)[0] if key.endswith(".base_layer.bias") else None
    return parent is not None and isinstance(model.get_submodule(parent), LoraLayer)


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` to directory ``path`` (created if needed) in PEFT's layout.

    Both files are written under hidden names inside ``path`` and renamed into place, the weights
    before the config, under the folder's lock (``replace_files_in_folder``): a reader never sees a
    truncated weights file, nor a config beside another save's weights, and two saves into one
    folder take turns. An earlier adapter in ``path`` is replaced (other files there are kept, and
    the new files keep the earlier ones' permissions); a failed save leaves ``path`` as it was, or
    absent if it was, and one cut short by a kill or a power cut is undone by the next save or load.
    ``path`` itself is never renamed, so it may be a mount point or another process's working directory.
    """
    tensors, config = adapter_state_dict(model, name)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(
            f"{out} is a file, but an adapter is a directory ({CONFIG_NAME} and {WEIGHTS_NAME}); "
            "give the path of a directory (it is created if missing)"
        )
    payload = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"

    # The config last: a reader that finds it finds these weights beside it. An earlier save's
    # legacy .bin goes too: the loader would not read it, but a reader of the folder could take it
    # for this adapter's weights.
    replace_files_in_folder(
        out,
        {
            WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
            CONFIG_NAME: lambda tmp: Path(tmp).write_text(payload),
        },
        removes=(LEGACY_WEIGHTS_NAME,),
    )
    return out
