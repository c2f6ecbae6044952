"""`rebuilt_in_backward`: keep the recipe of an adapted weight for backward, not the weight.

A module called with W0 + s B_e A_e in place of its parameter (``LoraParameter``) saves that
tensor, the size of the whole expert stack, for its own backward (∂x needs the weight), next to
the frozen W0 it holds anyway: one more parameter-sized tensor per adapted parameter and layer
until backward, a cost that grows with the model (docs/benchmarks.md).

Inside these saved-tensor hooks, a tensor saved for backward that is the adapted weight or a view
of it (an expert's slice, a transpose) is stored as where it sits in that weight. Backward builds
the weight again (the same batched GEMM, without autograd) when it first needs it and drops it
after the last saved view is used, so it lives for one layer's backward instead of from forward
to backward. The values are the forward's: A and B do not change between the two.

Every other saved tensor goes to the hooks that were in force around the call (torch applies only
the innermost pair): activation checkpointing, which is saved-tensor hooks too, and any offloading
the caller set up keep working inside the experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class _Recipe:
    storage: int  # data pointer of the adapted weight's storage: what its views share
    dtype: torch.dtype
    build: Callable[[], torch.Tensor]
    uses: int = 0  # saved views not yet unpacked
    built: torch.Tensor | None = None


@dataclass
class _View:
    """Where a saved tensor sits in an adapted weight."""

    recipe: _Recipe
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class _Outer:
    """What the enclosing hooks made of a saved tensor."""

    packed: object


def _enclosing_hooks():
    """The (pack, unpack) pair in force before ours, or None. torch has no public way to ask, and
    without it ours would keep what checkpointing or offloading around the call meant to drop."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, wrappers)
        return None


@contextmanager
def rebuilt_in_backward(weights: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]) -> Iterator[None]:
    """Within the block, tensors saved for backward that live in one of ``weights`` (each
    paired with a function that builds it again, called without autograd) are rebuilt in backward."""
    recipes = [_Recipe(_storage(w), w.dtype, build) for w, build in weights]
    enclosing = _enclosing_hooks()

    def pack(tensor: torch.Tensor):
        storage = _storage(tensor)
        for recipe in recipes:
            if storage == recipe.storage and storage and tensor.dtype == recipe.dtype:
                recipe.uses += 1
                return _View(recipe, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        return tensor if enclosing is None else _Outer(enclosing[0](tensor))

    def unpack(packed):
        if isinstance(packed, _Outer):
            return enclosing[1](packed.packed)
        if not isinstance(packed, _View):
            return packed
        recipe = packed.recipe
        if recipe.built is None:
            with torch.no_grad():
                recipe.built = recipe.build()
        view = recipe.built.as_strided(packed.shape, packed.stride, packed.offset)
        recipe.uses -= 1
        if recipe.uses <= 0:
            recipe.built = None  # the view keeps the storage for as long as backward needs it
        return view

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
