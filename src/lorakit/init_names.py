"""Initial-factor schemes by name: which lorakit knows, how PEFT spells them in files, and which
move part of W0 into the adapter (PiSSA, OLoRA). ``initialization.py`` draws the factors."""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

INITS = ("default", "gaussian", "pissa", "olora")  # and "pissa_niter_<N>": see valid_init

# PEFT's init_lora_weights values for each lorakit init ("pissa_niter_<N>" is spelt alike).
INIT_TO_PEFT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
_FAST_PISSA = re.compile(r"pissa_niter_(\d+)")


def valid_init(init: Any) -> bool:
    """One of ``INITS``, or ``"pissa_niter_<N>"``: PiSSA from a randomized SVD with N power
    iterations (PEFT's spelling; see ``initialization.py``)."""
    return init in INITS or (isinstance(init, str) and _FAST_PISSA.fullmatch(init) is not None)


def pissa_iterations(init: str) -> int | None:
    """N of ``"pissa_niter_<N>"``; None for any other init (``"pissa"``: the exact SVD)."""
    match = _FAST_PISSA.fullmatch(init)
    return int(match.group(1)) if match else None


def changes_base(init: str) -> bool:
    """Whether ``init`` moves the adapter's initial update out of W0 (PiSSA, OLoRA)."""
    return init in ("pissa", "olora") or pissa_iterations(init) is not None


INIT_CHOICES = f"one of {INITS} or 'pissa_niter_<N>' (PiSSA by a randomized SVD, N power iterations)"

# PEFT inits lorakit reads in files but does not draw. These leave W0 as it is, so a file saved
# with one is fully described by its weights (only a new adapter would start differently).
_PEFT_INITS_KEEPING_BASE = ("eva", "orthogonal", "mica")
# These moved part of W0 into the adapter from data lorakit does not have (activations, gradients,
# a quantizer's choices): the base the file's weights belong to cannot be rebuilt from W0.
_PEFT_INITS_FROM_DATA = ("corda", "loftq", "lora_ga")

UNCONVERTED_ADVICE = (
    "convert it in PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=DIR) writes the update "
    "against the original base), or, if you have the changed base model it was trained on, set "
    "init_lora_weights to true in its adapter_config.json and load it onto that model"
)


def init_from_peft(value: Any) -> str:
    """lorakit's init for a file's ``init_lora_weights``; ConfigError for inits whose changed base
    cannot be rebuilt (their update belongs to a W0 lorakit cannot recompute)."""
    if value is True or value is False or value == "default" or value in _PEFT_INITS_KEEPING_BASE:
        # False is PEFT's "random B" init. Like the others it left W0 alone: the weights say all.
        return "default"
    if valid_init(value):
        return value
    if value in _PEFT_INITS_FROM_DATA:
        raise ConfigError(
            f"init_lora_weights={value!r}: the adapter was trained against a base weight that init "
            f"changed using data lorakit does not have, so its update cannot be placed on the original "
            f"base; {UNCONVERTED_ADVICE}"
        )
    raise ConfigError(f"init_lora_weights={value!r} is not supported; use {INIT_CHOICES}")
