"""LoRA-FA (Zhang et al. 2023): A stays frozen at its init and only B trains.

    h = W0 x + s B A0 x        A0: the initial A, frozen

Half the trainable parameters and optimizer state of LoRA at the same rank; the update and the
saved file are plain LoRA's (the flag is not written into ``adapter_config.json``), so compressing
the adapter keeps it a LoRA-FA adapter.
"""

from __future__ import annotations

from typing import Any

from ..config import register_variant
from ..layers.variant import Variant


class LoraFa(Variant):
    name = "lora-fa"
    title = "LoRA-FA"
    legacy_flag = "lora_fa"
    kept_by_compression = True

    def attach(self, layer: Any, name: str, planned_layer: Any, trainable: bool) -> None:
        layer.lora_A[name].requires_grad_(False)


register_variant(LoraFa())
