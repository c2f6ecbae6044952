"""VeRA's shared frozen projections (Kopiczko et al. 2024).

    h = W0 x + b ⊙ (B_shared (d ⊙ (A_shared x)))      d: (r,)  b: (d_out,)  trained

One random pair A_shared (r × max d_in), B_shared (max d_out × r) serves every adapted layer of an
adapter (each layer slices what it needs), so an adapter stores only the scaling vectors d and b
per layer — and the seed the pair is drawn from. The draw matches PEFT's (Kaiming-uniform with
gain √2, from a CPU generator seeded with ``projection_prng_key``: A first, then B), so adapters
saved without their projections still load in both libraries.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen pair shared by all layers of one VeRA adapter.

    Registered as a child of every layer that uses it (so ``model.to(...)`` moves it once), with
    non-persistent buffers (so it is not repeated in the model's state dict).
    """

    def __init__(self, r: int, max_in: int, max_out: int, prng_key: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(prng_key)
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), generator), persistent=False)
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), generator), persistent=False)

    def sliced(self, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:, :d_in], B[:d_out]) for a layer of that shape."""
        return self.vera_A[:, :d_in], self.vera_B[:d_out]
