"""`memory_report`: where a model's bytes are, counted from the tensors themselves, and the measured peak.

Categories (each tensor counted once, in the first that claims it):

- ``quantized``: bitsandbytes' quantized base weights — the packed 4-bit (or int8) data, their
  scales (absmax, SCB), double quantization's nested state (the scales' own absmax, code and offset)
  and the code tables (NF4's 16 values). These tensors hang off the weight's ``quant_state`` or the
  layer's matmul state, where ``model.parameters()`` never looks.
- ``base``: the rest of the base model: full-precision parameters (embeddings, norms, the LM head,
  layers left unquantized) and buffers.
- ``adapters``: what LoRA layers and modules_to_save wrappers hold besides their base layer (A, B,
  magnitudes, VeRA's vectors, trainable copies), trained or not.
- ``gradients``: every ``.grad`` present now.
- ``optimizer_state``: every tensor in ``optimizer.state`` (AdamW's moments; bitsandbytes' 8-bit
  states, their absmax and quantization maps).

``tensor_bytes`` is their sum. The measured peak is the process's, not the tensors': on a GPU
``torch.cuda.max_memory_allocated`` (everything torch allocated there: activations included); on
the CPU the peak resident set size of the whole process (Python, libraries, everything).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .state import adapter_modules

# bitsandbytes' parameter classes, by name: lorakit need not import bitsandbytes to recognise them.
QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")
CATEGORIES = ("quantized", "base", "adapters", "gradients", "optimizer_state")


@dataclass(frozen=True)
class MemoryReport:
    """Bytes by category (see the module docstring) and the measured peak.

    ``quantized_parts`` splits ``quantized`` into packed / scales / nested / maps. ``peak`` is None
    where it cannot be measured; ``peak_label`` says what was measured.
    """

    quantized: int
    base: int
    adapters: int
    gradients: int
    optimizer_state: int
    peak: int | None = None
    peak_label: str = ""
    quantized_parts: dict[str, int] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        """All the tensors counted: the categories' sum."""
        return sum(getattr(self, name) for name in CATEGORIES)

    def as_dict(self) -> dict:
        return {**asdict(self), "tensor_bytes": self.tensor_bytes}

    def line(self) -> str:
        """One line of the model's own tensors (``summary``'s memory line)."""
        quantized = ""
        if self.quantized:
            parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.quantized_parts.items() if v)
            quantized = f"quantized base {human_bytes(self.quantized)} ({parts}) | "
        grads = f" | gradients {human_bytes(self.gradients)}" if self.gradients else ""
        optim = f" | optimizer state {human_bytes(self.optimizer_state)}" if self.optimizer_state else ""
        return (
            f"memory: {quantized}{'rest of base' if self.quantized else 'base'} {human_bytes(self.base)} | "
            f"adapters {human_bytes(self.adapters)}{grads}{optim} | tensors {human_bytes(self.tensor_bytes)}"
        )

    def __str__(self) -> str:
        rows = [("quantized base weights", self.quantized)]
        rows += [(f"  {name}", value) for name, value in self.quantized_parts.items()]
        rows += [
            ("rest of the base", self.base),
            ("adapters", self.adapters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("tensors in all", self.tensor_bytes),
        ]
        lines = [f"{name:<26}{human_bytes(value):>12}" for name, value in rows]
        if self.peak is not None:
            lines.append(f"{'measured peak':<26}{human_bytes(self.peak):>12}  ({self.peak_label})")
        return "\n".join(lines)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Bytes of ``model``'s tensors by category, plus ``optimizer``'s state, and the measured peak.

    Counts what the tensors hold now: gradients only exist between a backward and
    ``zero_grad(set_to_none=True)``, an optimizer's state only after its first step.
    """
    seen: set[tuple[int, int, torch.dtype]] = set()

    def fresh(t: torch.Tensor) -> int:
        """``t``'s bytes the first time it is met, 0 after (tied weights, shared views)."""
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.device.type == "meta" or key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    parts = {"packed": 0, "scales": 0, "nested": 0, "maps": 0}
    for module in model.modules():
        for part, tensor in _quantized_tensors(module):
            parts[part] += fresh(tensor)
    adapters = 0
    for holder in adapter_modules(model):
        base = getattr(holder, "base_layer", None) or getattr(holder, "original_module", None)
        own = {id(t) for t in (*base.parameters(), *base.buffers())} if base is not None else set()
        adapters += sum(fresh(t) for t in (*holder.parameters(), *holder.buffers()) if id(t) not in own)
    base_bytes = sum(fresh(t) for t in (*model.parameters(), *model.buffers()))
    gradients = sum(fresh(p.grad) for p in model.parameters() if p.grad is not None)
    optimizer_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            optimizer_bytes += sum(fresh(t) for t in _tensors_in(state))
    peak, label = measured_peak(_device_of(model))
    return MemoryReport(
        quantized=sum(parts.values()),
        base=base_bytes,
        adapters=adapters,
        gradients=gradients,
        optimizer_state=optimizer_bytes,
        peak=peak,
        peak_label=label,
        quantized_parts=parts,
    )


def _quantized_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(part, tensor) for a bitsandbytes layer's quantized weight and everything it is read with."""
    weight = module._parameters.get("weight")
    if weight is None or type(weight).__name__ not in QUANTIZED_PARAMETERS:
        return
    yield "packed", weight
    quant_state = getattr(weight, "quant_state", None)  # Params4bit
    if quant_state is not None:
        yield from _quant_state_tensors(quant_state, nested=False)
    for name in ("CB", "SCB"):  # Int8Params: the int8 rows (often the weight itself) and their scales
        tensor = getattr(weight, name, None)
        if isinstance(tensor, torch.Tensor):
            yield ("packed" if name == "CB" else "scales"), tensor
    matmul_state = getattr(module, "state", None)  # Linear8bitLt's state: where CB/SCB go after a forward
    for name, tensor in vars(matmul_state).items() if hasattr(matmul_state, "__dict__") else ():
        if isinstance(tensor, torch.Tensor):
            yield ("scales" if name.startswith("S") else "packed"), tensor


def _quant_state_tensors(quant_state, nested: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """A QuantState's tensors: absmax (scales), code (maps), offset, and state2 (double quantization)."""
    for name, value in vars(quant_state).items():
        if isinstance(value, torch.Tensor):
            part = "nested" if nested or name == "offset" else ("maps" if name == "code" else "scales")
            yield part, value
        elif type(value).__name__ == "QuantState":
            yield from _quant_state_tensors(value, nested=True)


def _tensors_in(value) -> Iterator[torch.Tensor]:
    """Every tensor inside an optimizer's per-parameter state (dicts nest: bitsandbytes')."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def measured_peak(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """(bytes, what they are): CUDA's peak allocated on a GPU, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), f"torch.cuda.max_memory_allocated on {device}"
    try:
        import resource
    except ImportError:  # Windows
        return None, "not measured (no resource module)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss if sys.platform == "darwin" else rss * 1024, "peak RSS, process-wide (Python and all libraries)"


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
