"""What the model patches share: recognising a class by its ``forward``'s code, and gathering the
fused operands of the LoRA layers that one patched call covers.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
from torch import nn

from ..kernels.dispatch import fusable_operands, plan_directions, planned_tokens
from ..kernels.projection import Projection


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
    when every layer's call on ``x`` is covered by the fused functions without dropout, else None:
    what a function fusing several projections of one input (``kernels/gated_mlp.py``,
    ``kernels/sibling_projections.py``) needs."""
    tokens = planned_tokens(x)
    plans, linear_tensors, magnitudes = [], [], []
    for layer in layers:
        operands = fusable_operands(layer, x)
        if operands is None or operands[6] is not None:  # dropout: per layer
            return None
        weight, bias, A, B, scaling, magnitude, _ = operands
        plans.append(Projection(scaling, *plan_directions(tokens, weight, magnitude)))
        linear_tensors += [weight, bias, A, B]
        magnitudes.append(magnitude)
    return tuple(plans), linear_tensors, magnitudes
