"""`WeightMerging`: what a `LoraLayer` does to and with its base weight — merging adapters into the
weight and taking them out again, recovering W0, and the per-output-unit geometry variants such as
DoRA use.

Each adapter's change is taken against the original W0 (``unmerged_weight``), so merging and
unmerging work in any order. What a merge writes is the adapter variant's answer
(``Variant.merge_change``): ``s B A`` for LoRA, ``(c - 1) W0 + c dW`` for a variant that rescales
output units by c (DoRA). Such a c must stay away from 0 while W0 is still needed
(``require_recoverable``). A mixin of `LoraLayer` (``layers/base.py``), which holds the adapters
these methods read.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AdapterStateError
from ..kernels.casting import accumulation_dtype


class WeightMerging:
    """Merging for `LoraLayer`; see the module docstring."""

    # --- per-output-unit geometry -------------------------------------------------------------
    def magnitude_shape(self) -> tuple[int, ...]:
        """Shape of a per-unit vector (DoRA's m): one entry per output unit, laid out to
        broadcast on the output."""
        return (self.base_weight.shape[self.unit_dim],)

    def unit_view(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-unit vector reshaped to broadcast against the base weight."""
        shape = [1] * self.base_weight.dim()
        shape[self.unit_dim] = -1
        return vector.reshape(shape)

    def unit_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Norm of each output unit of a weight laid out like W0, in ``magnitude_shape()``."""
        dims = [d for d in range(weight.dim()) if d != self.unit_dim]
        return torch.linalg.vector_norm(weight, dim=dims).reshape(self.magnitude_shape())

    # --- W0 ----------------------------------------------------------------------------------
    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """W0: the base weight without the adapters merged into it; the base weight itself while
        none is, else a float32 (or wider) copy.

        Every merge adds a change taken against W0 (see ``merge``): dW, or (c - 1) W0 + c dW for
        a variant that rescales output units by c (``Variant.merged_scale``; DoRA). The merged
        weight is thus W = W0 (1 + sum (c - 1)) + sum c dW (c = 1 for LoRA), solved here for W0 —
        in any order of merging and unmerging, where keeping a copy of W0 would cost its memory
        (``merge`` and ``unmerge`` keep the factor 1 + sum (c - 1) away from 0)."""
        weight = self.base_weight
        if not self.merged_adapters:
            return weight
        rest = weight.to(accumulation_dtype(weight.dtype))
        factor = None
        for name in self.merged_adapters:
            delta = self.delta_weight(name)
            scale = self.variants[name].merged_scale(self, name, self.merge_records.get(name))
            if scale is None:
                rest = rest - delta
                continue
            rest = rest - scale * delta
            factor = (1 if factor is None else factor) + (scale - 1)
        return rest if factor is None else rest / factor

    def require_recoverable(self, records: dict[str, Any], action: str, fix: str) -> None:
        """Refuse ``action`` (nothing written yet) if it would leave the adapters merged with
        ``records`` (adapter -> merge record) scaling W0 by a factor near 0 in some output unit.

        ``unmerged_weight`` divides by that factor, 1 + sum (c - 1): the rounding of the stored
        weight grows by its inverse, and at 0 W0 is gone (forward and unmerge give inf/NaN). Keep
        at least half the digits of the weight's dtype: |factor| >= sqrt(eps)."""
        scales = [self.variants[n].merged_scale(self, n, record) for n, record in records.items()]
        scales = [c for c in scales if c is not None]
        if not scales:
            return
        factor = 1 + sum(c - 1 for c in scales)
        dtype = self.base_weight.dtype
        tolerance = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps ** 0.5
        small = ~(factor.abs() >= tolerance)  # NaN counts as small
        if small.any():
            scaling = [n for n, r in records.items() if self.variants[n].merged_scale(self, n, r) is not None]
            raise AdapterStateError(
                f"{action} would leave the merged adapters {scaling} scaling W0 by "
                f"{factor.abs().min().item():.3g} (1 + the sum of c - 1, c each one's per-unit scale) in "
                f"{int(small.sum())} output unit(s), where W0 could not be recovered (unmerge and unmerged "
                f"adapters need it); {fix}"
            )

    @torch.no_grad()
    def check_merge(self, names: list[str]) -> None:
        """Raise AdapterStateError if merging ``names`` (this layer's among them, in this order)
        would make W0 unrecoverable (see ``merge``); nothing is written."""
        records = dict(self.merge_records)
        for name in names:
            if name in self.variants and name not in records:
                self.variants[name].check_merge(self, name, records)

    # --- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str, final: bool = False) -> None:
        """Add the adapter's change into the base weight, so ``forward`` skips the adapter: its
        variant's ``merge_change`` (``s B A`` for LoRA), taken against W0, the weight without the
        adapters merged before (``unmerged_weight()``).

        Raises AdapterStateError, before writing, for a change that would leave W0 unrecoverable
        (``require_recoverable``). ``final``: the layer is about to be replaced by its merged base
        layer (``unload``), so W0 is never needed again and that check is skipped. The
        bookkeeping changes only once the weight is written, so a failed write (out of memory)
        leaves the layer as it was."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is already merged; unmerge it before merging again")
        change, record = self.variants[name].merge_change(self, name, check=not final)
        self.add_to_weight(change)
        if record is not None:
            self.merge_records[name] = record
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Subtract the adapter's change from the base weight again.

        Any merged adapter, in any order, except one whose going would leave the others scaling
        W0 by about 0 (see ``merge``); the reverse order of merging never does. As with ``merge``,
        a failed write leaves the adapter merged, its record kept."""
        if name not in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is not merged")
        change = self.variants[name].unmerge_change(self, name, self.merge_records.get(name))
        self.add_to_weight(-change)
        self.merge_records.pop(name, None)
        self.merged_adapters.remove(name)

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """W0 += delta (laid out like W0), as ``weight_plus`` computes it.

        Writes in place so tied or shared weights (and anything holding a reference to the
        tensor) see the change."""
        self.base_weight.copy_(self.weight_plus(self.base_weight, delta))

    @staticmethod
    @torch.no_grad()
    def weight_plus(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``weight + delta`` as a new tensor in ``weight``'s dtype and on its device, summed in
        float32 (or wider) whatever the weight's dtype and rounded once."""
        acc = accumulation_dtype(weight.dtype)
        return (weight.to(acc) + delta.to(weight.device, acc)).to(weight.dtype)
