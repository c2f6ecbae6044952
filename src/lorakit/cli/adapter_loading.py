"""What eval, generate, chat and the demos load: a base model with adapters from their folders,
each adapter named after its run."""

from __future__ import annotations

from pathlib import Path


def load_with_adapters(
    model_name: str, adapter_dirs: list[str], device: str | None, dtype: str, activate: bool = True, **load_options
):
    """(model, tokenizer, adapter names): the base model in eval mode with every given adapter
    loaded, each named after its run (``source_names``), all active
    (their updates add up) or, with ``activate=False``, none. Active adapters with parameter
    targets (expert stacks) come merged into the weights. ``load_options`` go to ``load_model``
    (``quantize=...``)."""
    from .. import load_adapter, merge, set_adapter
    from ..layers.parameter import LoraParameter
    from ..models import load_model
    from ..state import lora_layers

    model, tokenizer = load_model(model_name, dtype=dtype, device=device, **load_options)
    names = [load_adapter(model, path, name=name, activate=False) for path, name in source_names(adapter_dirs)]
    if names and activate:
        set_adapter(model, names)
        if any(isinstance(layer, LoraParameter) for _, layer in lora_layers(model)):
            # Expert stacks adapted as parameters are rebuilt on every forward, every generated
            # token included; merged, inference costs what the base model does.
            merge(model, names)
    model.eval()
    return model, tokenizer, names


def source_names(adapter_dirs: list[str]) -> list[tuple[str, str]]:
    """(path, name) per adapter directory: named after its folder, or after its run's folder where
    the folder is a run's ``adapter`` (runs/a/adapter is "a", not "adapter"), made unique with
    ``_2``, ``_3``, ... (runs/a/adapter and runs/a_2 notwithstanding)."""
    taken: set[str] = set()
    named = []
    for i, path in enumerate(adapter_dirs):
        folder = Path(path).resolve()
        if folder.name == "adapter" and folder.parent.name:
            folder = folder.parent
        wanted = folder.name.replace(".", "_") or f"adapter{i}"
        name, n = wanted, 1
        while name in taken:
            n += 1
            name = f"{wanted}_{n}"
        taken.add(name)
        named.append((path, name))
    return named
