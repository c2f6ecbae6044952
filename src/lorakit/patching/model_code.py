"""What the model patches share: recognising a class by its ``forward``'s code, and gathering the
fused operands of the LoRA layers that one patched call covers.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..kernels.dispatch import projection_operands
from ..layers.linear import LoraLinear


def forward_code(cls: type) -> str | None:
    """``cls.forward``'s source without docstrings, comments and whitespace (None when it has no
    readable source): how ``gated_mlp`` and ``attention_siblings`` recognise model code."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    source = re.sub(r'"""(?:.|\n)*?"""', "", source)
    code = "".join(line.split("#")[0] for line in source.splitlines())
    return "".join(code.split())


def fusable_projections(layers: Sequence[nn.Module], x: torch.Tensor):
    """(the ``Projection`` records, [weight, bias, A, B] of each layer in one list, the magnitudes)
    when every layer's call on x (..., d_in) is covered by the fused functions without dropout,
    else None (a layer that is not, or no longer, a LoRA layer included): what a function fusing
    several projections of one input (``kernels/gated_mlp.py``, ``kernels/sibling_projections.py``)
    takes."""
    operands = []
    for layer in layers:
        found = layer.fused_operands(x) if isinstance(layer, LoraLinear) else None
        if found is None or found.dropout is not None:  # dropout: per layer
            return None
        operands.append(found)
    return projection_operands(x, operands)
