"""Methods: what trains in a run (`Method`): LoRA, full fine-tuning, BitFit, the frozen model,
PEFT's prompt tuning / prefix tuning / IA³, and the Houlsby bottleneck adapter.

One file per method; `make_method(name)` picks the one ``TrainConfig.method`` names. This package
sits beside `lorakit.tasks`, below `lorakit.training`: it adds to and freezes the model, the
training package trains and saves what it is handed.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .bitfit import BitFit, BitFitAdded
from .frozen import Frozen
from .full import FullFineTuning
from .houlsby import Houlsby
from .lora import Lora
from .peft_methods import IA3, PrefixTuning, PromptTuning, require_peft

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Lora(),
        FullFineTuning(),
        BitFit(),
        BitFitAdded(),
        Frozen(),
        PromptTuning(),
        PrefixTuning(),
        IA3(),
        Houlsby(),
    )
}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def make_method(name: str) -> Method:
    """The method called ``name``; ConfigError listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {' | '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def check_method(name: str, options) -> dict:
    """Validate ``method`` and ``method_options`` (a mapping, or None) together, before anything
    loads: an unknown method or option, or PEFT missing for a method PEFT runs."""
    method = make_method(name)
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"method_options must be a mapping of option names to values, got {options!r}")
    checked = method.check_options(dict(options or {}))
    if method.by_peft:
        require_peft(name)
    return checked


__all__ = ["METHODS", "Method", "check_method", "make_method", "method_names"]
