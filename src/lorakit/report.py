"""Counting and describing: `trainable_parameters`, `summary`."""

from __future__ import annotations

from torch import nn

from .memory import memory_report
from .quantization import parameter_count
from .state import active_adapters, adapter_configs, lora_layers, merged_adapters, saved_modules


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters), shared parameters counted once; a packed
    4-bit parameter counts the weights it holds (two per byte), as PEFT counts it."""
    trainable = total = 0
    for param in model.parameters():
        count = parameter_count(param)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def adapter_parameter_count(model: nn.Module, name: str) -> int:
    """Parameters belonging to adapter ``name`` (A, B, its variant's own and its modules_to_save copies)."""
    count = 0
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            count += sum(t.numel() for t in layer.variants[name].trained_tensors(layer, name))
    for _, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            count += sum(p.numel() for p in wrapper.modules_to_save[name].parameters())
    return count


def summary(model: nn.Module) -> str:
    """One line of parameter counts, a line per adapter (rank, modules, params, state), and a line of
    the tensors' bytes (`memory_report`: quantized base, rest of the base, adapters)."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"]
    active, merged = active_adapters(model), merged_adapters(model)
    for name, config in adapter_configs(model).items():
        layers = [layer for _, layer in lora_layers(model) if name in layer.lora_A]
        ranks = sorted({layer.rank(name) for layer in layers})
        saved = [path for path, w in saved_modules(model) if name in w.modules_to_save]
        state = ", ".join(s for s, on in (("active", name in active), ("merged", name in merged)) if on) or "inactive"
        lines.append(
            f"adapter {name!r}: {config.variant} r={'/'.join(map(str, ranks))} alpha={config.alpha:g}"
            f"{' rslora' if config.use_rslora else ''} init={config.init} on {len(layers)} modules"
            f"{f' + modules_to_save {saved}' if saved else ''}, "
            f"{adapter_parameter_count(model, name):,} params [{state}]"
        )
    lines.append(memory_report(model).line())
    return "\n".join(lines)
