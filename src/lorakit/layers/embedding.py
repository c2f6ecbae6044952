"""`LoraEmbedding`: LoRA on ``nn.Embedding``.

    h = W0[ids] + s * (A^T[ids]) B^T        A: (r, num_embeddings)   B: (embedding_dim, r)

Looking up rows of A^T is the same as multiplying a one-hot input by A, so this is the linear
formula applied to one-hot vectors. Dropout on token ids has no meaning and is not applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA around an embedding table; see the module docstring for the formula and shapes."""

    peft_keys = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
    unit_dim = 1  # DoRA: one magnitude per embedding dimension, as in PEFT

    @property
    def in_dim(self) -> int:
        return self.base_weight.shape[0]

    @property
    def out_dim(self) -> int:
        return self.base_weight.shape[1]

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_dim), (self.out_dim, r)

    def add_adapter(
        self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout: float, **options
    ) -> None:
        # No dropout module at all (not an unused one): the DoRA path takes a dropout module as
        # the sign that the adapter saw a different input than the base, and the base output
        # would then be recomputed from token ids.
        super().add_adapter(name, A, B, scaling, 0.0, **options)

    def dropped_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x  # token ids: nothing to drop or cast

    def output_bias(self) -> None:
        return None

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        weight = self.unmerged_weight().to(base.weight.dtype)
        return F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def apply_lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B, s = self.live_factors(name)
        base = self.base_layer
        after_A = F.embedding(
            x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return (after_A @ B.T) * s

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B, s = self.factors(name)
        return (B @ A).T * s
