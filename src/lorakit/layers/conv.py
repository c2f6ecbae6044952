"""`LoraConv`: LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

    h = conv(x, W0) + s * conv1x1(conv(dropout(x), A), B)

A has the base kernel with r output channels, shape (r, C_in, *k), and uses the base's stride,
padding and dilation; B is a 1×1 convolution, shape (C_out, r, 1, ...). The dense update is
``ΔW[o] = s * sum_j B[o, j] A[j]``, a (C_out, C_in, *k) kernel that merges into W0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError
from .base import LoraLayer

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    """LoRA around a convolution; see the module docstring for the formula and shapes."""

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise TargetError(
                f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported; "
                "exclude this module with exclude_modules"
            )
        super().__init__(base_layer)
        self.spatial_dims = base_layer.weight.dim() - 2

    @property
    def in_dim(self) -> int:
        return self.base_weight.shape[1]

    @property
    def out_dim(self) -> int:
        return self.base_weight.shape[0]

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kernel = tuple(self.base_weight.shape[2:])
        return (r, self.in_dim, *kernel), (self.out_dim, r, *([1] * self.spatial_dims))

    def apply_lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # The base's own _conv_forward applies its stride, padding (and padding mode), dilation.
        A, B, s = self.live_factors(name)
        after_A = self.base_layer._conv_forward(x, A, None)
        return _CONV_FN[self.spatial_dims](after_A, B) * s

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.unmerged_weight().to(x.dtype), None)

    def output_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        return None if bias is None else bias.view(1, -1, *([1] * self.spatial_dims))

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_dim, *([1] * self.spatial_dims))  # PEFT's layout for conv DoRA

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B, s = self.factors(name)
        delta = B.flatten(1) @ A.flatten(1)  # (C_out, r) @ (r, C_in * prod(k))
        return delta.reshape(self.base_weight.shape) * s
