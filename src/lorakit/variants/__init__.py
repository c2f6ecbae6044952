"""The members of the LoRA family, one file each, registered by name for ``LoraConfig(variant=...)``.

Plain LoRA is the protocol's own behaviour (``layers/variant.py``); each file here overrides what
its variant changes and registers itself. A new variant is a new file plus its import below.
"""

from ..config import register_variant
from ..layers.variant import LORA

register_variant(LORA)

from . import adalora, dora, dylora, lora_fa, vera  # noqa: E402,F401  (each registers itself)
