"""`SlotStack`: one linear layer's adapters in numbered slots, for mixed-adapter batches.

    A: (S, r_max, d_in)   B: (S, d_out, r_max)   gm1: (S, d_out) float32 (float64 stacks: float64), or None

Slot k holds one adapter's factors with its rank zero-padded to r_max and its per-module scaling
(and DoRA's per-unit scale g) folded into B, in the layer's dtype, on the layer's device; slot 0
stays zero (rows without an adapter). Zero padding leaves the update unchanged:

    [B s g, 0] [A; 0] = g s B A

``kernels/multi_lora.py`` adds ``B[slot] A[slot] x`` per token. A DoRA adapter adds
g ⊙ (W0 x + s B A x) - W0 x (g = m / ||W0 + s B A|| per output unit, computed from W0 when the
slot is written), which is (g - 1) ⊙ W0 x plus the folded product: ``gm1[slot] = g - 1`` holds the
first term's factor (zero for plain LoRA slots); the table exists once a DoRA adapter is written.

r_max grows with the largest rank written (rounded up to a multiple of 8, so every stride is a
16-byte multiple, which grouped GEMMs require), up to ``max_rank``: a pool sized for rank 64 that
serves rank-16 adapters computes at rank 16.

The stack is a plain object kept in the layer's ``__dict__``, not a module: its tensors are not
the model's state (no state-dict keys, no parameters), and the pool that owns it places it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AdapterStateError
from ..kernels.casting import accumulation_dtype

RANK_MULTIPLE = 8


class SlotStack:
    """Slots 0 .. S-1 of one layer (slot 0: no adapter); see the module docstring.

    Attributes:
        A, B, gm1: the stacked tensors (shapes above).
        ranks: slot -> rank of the adapter written there (0: empty).
        version: bumped by every write or clear (for callers that cache what they derive).
        allocations: bumped whenever A, B or gm1 becomes a new tensor (r_max grows, the first
            DoRA adapter is written): a CUDA graph captured over the old tensors must be captured
            again.
    """

    def __init__(self, layer: Any, num_slots: int, max_rank: int, dtype: torch.dtype | None = None) -> None:
        if num_slots < 2:
            raise ValueError(f"a slot stack needs slot 0 and at least one adapter slot; got {num_slots} slots")
        weight = layer.base_weight
        self.layer = layer
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.d_in, self.d_out = layer.in_dim, layer.out_dim
        self.dtype = dtype or weight.dtype
        self.device = weight.device
        self.A = torch.zeros(num_slots, 0, self.d_in, dtype=self.dtype, device=self.device)
        self.B = torch.zeros(num_slots, self.d_out, 0, dtype=self.dtype, device=self.device)
        self.gm1: torch.Tensor | None = None
        self.ranks = [0] * num_slots
        self.version = 0
        self.allocations = 0

    @property
    def r_max(self) -> int:
        return self.A.shape[1]

    def _grow(self, r: int) -> None:
        width = -(-r // RANK_MULTIPLE) * RANK_MULTIPLE
        if width <= self.r_max:
            return
        A = self.A.new_zeros(self.num_slots, width, self.d_in)
        B = self.B.new_zeros(self.num_slots, self.d_out, width)
        A[:, : self.r_max] = self.A
        B[:, :, : self.r_max] = self.B
        self.A, self.B = A, B
        self.allocations += 1

    @torch.no_grad()
    def write(
        self,
        slot: int,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Put an adapter into ``slot``: A (r, d_in), B (d_out, r), its scaling s for this module,
        and for DoRA its magnitudes m (d_out,). s (and g) multiply B in float32 (or wider) before
        rounding to the stack's dtype, as hot-swap does."""
        if not 0 < slot < self.num_slots:
            raise AdapterStateError(f"slot {slot} is not an adapter slot of this stack (1 .. {self.num_slots - 1})")
        r = A.shape[0]
        if A.shape != (r, self.d_in) or B.shape != (self.d_out, r):
            raise AdapterStateError(
                f"factors of shapes {tuple(A.shape)}, {tuple(B.shape)} do not fit a layer of "
                f"d_in={self.d_in}, d_out={self.d_out}"
            )
        if r > self.max_rank:
            raise AdapterStateError(f"rank {r} exceeds the slots' maximum rank {self.max_rank}")
        if scaling == 1.0 and magnitude is None:  # a pool's host copies: s folded into B already
            self._place(slot, A, B, None)
            return
        wide = accumulation_dtype(torch.promote_types(A.dtype, self.dtype))
        # From page-locked host memory the copies run asynchronously (torch keeps the host block
        # until they finish); a pool writing a cold adapter makes hundreds of them.
        A_w = A.to(self.device, wide, non_blocking=True)
        B_w = B.to(self.device, wide, non_blocking=True)
        if scaling != 1.0:
            B_w = B_w * scaling
        g = None
        if magnitude is not None:
            g = magnitude.to(self.device, wide, non_blocking=True).reshape(-1) / self._unit_norm(A_w, B_w)
            B_w = B_w * g[:, None]
        self._place(slot, A_w, B_w, g)

    def _place(self, slot: int, A: torch.Tensor, B: torch.Tensor, g: torch.Tensor | None) -> None:
        """The factors A (r, d_in), B (d_out, r) (any dtype, host or device) into ``slot``: each
        copied straight in, rounded to the stack's dtype once, only the padding beyond its rank
        zeroed; DoRA's g (d_out,) or None. A cold adapter's write makes this call per module
        (hundreds), so it makes as few device operations as it can."""
        r = A.shape[0]
        self._grow(r)
        if r < self.r_max:
            self.A[slot, r:].zero_()
            self.B[slot, :, r:].zero_()
        # From page-locked host memory the copies run asynchronously (torch keeps the host block
        # until they finish).
        self.A[slot, :r].copy_(A, non_blocking=True)
        self.B[slot, :, :r].copy_(B, non_blocking=True)
        if g is not None:
            if self.gm1 is None:
                wide = accumulation_dtype(self.dtype)
                self.gm1 = torch.zeros(self.num_slots, self.d_out, dtype=wide, device=self.device)
                self.allocations += 1
            self.gm1[slot] = g - 1
        elif self.gm1 is not None:
            self.gm1[slot].zero_()
        self.ranks[slot] = r
        self.version += 1

    def _unit_norm(self, A: torch.Tensor, sB: torch.Tensor) -> torch.Tensor:
        """||W0 + s B A|| per output unit, (d_out,), from the layer's W0 (without merged adapters)."""
        layer = self.layer
        weight = layer.unmerged_weight()
        merged = weight.to(A.dtype) + layer.dense_update(A, sB, 1.0)
        return layer.unit_norm(merged).reshape(-1)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Empty ``slot`` (its rows then get no update)."""
        if not 0 < slot < self.num_slots:
            raise AdapterStateError(f"slot {slot} is not an adapter slot of this stack (1 .. {self.num_slots - 1})")
        self.A[slot].zero_()
        self.B[slot].zero_()
        if self.gm1 is not None:
            self.gm1[slot].zero_()
        self.ranks[slot] = 0
        self.version += 1

    def dora_table(self) -> torch.Tensor | None:
        """``gm1`` when some slot holds a DoRA adapter, else None (the kernels skip the term)."""
        return self.gm1

    def nbytes(self) -> int:
        """Device bytes the stack holds."""
        extra = self.gm1.numel() * self.gm1.element_size() if self.gm1 is not None else 0
        return (self.A.numel() + self.B.numel()) * self.A.element_size() + extra
