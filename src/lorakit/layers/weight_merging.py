"""`WeightMerging`: what a `LoraLayer` does to and with its base weight — DoRA's norms and
magnitudes, merging adapters into the weight and taking them out again, and recovering W0.

Each adapter's change is taken against the original W0 (``unmerged_weight``), so merging and
unmerging work in any order; a DoRA adapter merged scales W0 by m / ||W0 + s B A|| per output
unit, which must stay away from 0 while W0 is still needed (``_require_solvable``).
A mixin of `LoraLayer` (``layers/base.py``), which holds the adapters these methods read.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterStateError
from ..kernels.casting import accumulation_dtype


class WeightMerging:
    """DoRA and merging for `LoraLayer`; see the module docstring."""

    # --- DoRA --------------------------------------------------------------------------------
    def magnitude_shape(self) -> tuple[int, ...]:
        """Shape of DoRA's m: one entry per output unit, laid out to broadcast on the output."""
        return (self.base_weight.shape[self.unit_dim],)

    def _unit_view(self, vector: torch.Tensor) -> torch.Tensor:
        """A per-unit vector reshaped to broadcast against the base weight."""
        shape = [1] * self.base_weight.dim()
        shape[self.unit_dim] = -1
        return vector.reshape(shape)

    def _unit_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Norm of each output unit of a weight laid out like W0, in ``magnitude_shape()``."""
        dims = [d for d in range(weight.dim()) if d != self.unit_dim]
        return torch.linalg.vector_norm(weight, dim=dims).reshape(self.magnitude_shape())

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """``||W0 + s B A||`` per output unit, in ``magnitude_shape()`` (W0: ``unmerged_weight()``).

        Always a constant for autograd (DoRA's norm is detached, as the paper recommends), so no
        graph is built for the dense matrix."""
        weight = self.unmerged_weight()
        return self._unit_norm(weight.to(accumulation_dtype(weight.dtype)) + self.delta_weight(name))

    @torch.no_grad()
    def dora_weight_change(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What DoRA adapter ``name`` does to the weight, and the norm it used.

        Returns ``m / ||W0 + dW|| * (W0 + dW) - W0`` laid out like W0 (float32 or wider) and
        ``||W0 + dW||`` per output unit (``magnitude_shape()``), which ``unmerge`` needs to undo
        a merge exactly (the norm changes once the weight has). W0 is ``unmerged_weight()``."""
        delta = self.delta_weight(name)
        weight = self.unmerged_weight().to(delta.dtype)
        norm = self._unit_norm(weight + delta)
        return self._dora_change(name, weight, delta, norm), norm

    def _dora_change(self, name: str, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """``(c - 1) W0 + c dW`` with c = m / norm per unit: DoRA's change to W0 (= weight)."""
        scale = self._dora_scale(name, norm)
        return (scale - 1) * weight + scale * delta

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """W0: the base weight without the adapters merged into it; the base weight itself while
        none is, else a float32 (or wider) copy.

        Every merge adds a change taken against W0 (see ``merge``): dW for LoRA, (c - 1) W0 + c dW
        for DoRA, with c = m / ||W0 + dW|| per unit (the norm kept from the merge). The merged
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
            if name not in self._dora_merge_norms:
                rest = rest - delta
                continue
            scale = self._dora_scale(name, self._dora_merge_norms[name])
            rest = rest - scale * delta
            factor = (1 if factor is None else factor) + (scale - 1)
        return rest if factor is None else rest / factor

    def _require_solvable(self, norms: dict[str, torch.Tensor], action: str, fix: str) -> None:
        """Refuse ``action`` (nothing written yet) if it would leave the DoRA adapters merged with
        ``norms`` scaling W0 by a factor near 0 in some output unit.

        ``unmerged_weight`` divides by that factor, 1 + sum (c - 1): the rounding of the stored
        weight grows by its inverse, and at 0 W0 is gone (forward and unmerge give inf/NaN). Keep
        at least half the digits of the weight's dtype: |factor| >= sqrt(eps)."""
        if not norms:
            return
        factor = 1 + sum(self._dora_scale(name, norm) - 1 for name, norm in norms.items())
        dtype = self.base_weight.dtype
        tolerance = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps ** 0.5
        small = ~(factor.abs() >= tolerance)  # NaN counts as small
        if small.any():
            raise AdapterStateError(
                f"{action} would leave the merged DoRA adapters {list(norms)} scaling W0 by "
                f"{factor.abs().min().item():.3g} (1 + the sum of m/||W0 + dW|| - 1) in {int(small.sum())} output "
                f"unit(s), where W0 could not be recovered (unmerge and unmerged adapters need it); {fix}"
            )

    @torch.no_grad()
    def check_merge(self, names: list[str]) -> None:
        """Raise AdapterStateError if merging ``names`` (this layer's among them, in this order)
        would make W0 unrecoverable (see ``merge``); nothing is written."""
        norms = dict(self._dora_merge_norms)
        for name in names:
            if name in self.lora_magnitude_vector and name not in norms:
                norms[name] = self.weight_norm(name)
                self._require_merge_solvable(name, norms)

    def _require_merge_solvable(self, name: str, norms: dict[str, torch.Tensor]) -> None:
        dora = list(norms)
        fix = (f"merge fewer of the DoRA adapters {dora} at once (lorakit.unmerge(model) takes merged ones out)"
               if len(dora) > 1 else "keep it unmerged")
        self._require_solvable(norms, f"merging DoRA adapter {name!r}", f"{fix}, or write their effect into the "
                               f"base weights for good with lorakit.combine(model, {dora}, into_base=True)")

    def _dora_scale(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """c = m / norm, laid out to broadcast against the base weight."""
        return self._unit_view(self.lora_magnitude_vector[name].to(norm.dtype) / norm)

    @torch.no_grad()
    def init_magnitude(self, name: str, trainable: bool = True) -> None:
        """Make ``name`` a DoRA adapter with m = ||W0 + s B A|| (so outputs do not change)."""
        dtype = self.lora_A[name].dtype
        self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name).to(dtype), requires_grad=trainable)

    # --- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str, final: bool = False) -> None:
        """Add the adapter's change into the base weight, so ``forward`` skips the adapter: ``s B A``,
        or for DoRA ``m / ||W0 + s B A|| (W0 + s B A) - W0``, W0 being the weight without the
        adapters merged before (``unmerged_weight()``).

        Raises AdapterStateError, before writing, for a DoRA adapter that would leave W0
        unrecoverable: the merged DoRA adapters scale it by 1 + sum (c - 1), which must stay away
        from 0 (``_require_solvable``). ``final``: the layer is about to be replaced by its merged
        base layer (``unload``), so W0 is never needed again and that check is skipped (a unit
        whose magnitude is 0 then merges to a zero row, as the adapted layer computes). The
        bookkeeping changes only once the weight is written, so a failed write (out of memory)
        leaves the layer as it was."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is already merged; unmerge it before merging again")
        norm = None
        if name in self.lora_magnitude_vector:
            delta, norm = self.dora_weight_change(name)
            if not final:
                self._require_merge_solvable(name, {**self._dora_merge_norms, name: norm})
        else:
            delta = self.delta_weight(name)
        self.add_to_weight(delta)
        if norm is not None:
            self._dora_merge_norms[name] = norm
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Subtract the adapter's change from the base weight again.

        Any merged adapter, in any order, except a DoRA adapter whose going would leave the others
        scaling W0 by about 0 (see ``merge``); the reverse order of merging never does. As with
        ``merge``, a failed write leaves the adapter merged, its norm kept."""
        if name not in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is not merged")
        delta = self.delta_weight(name)
        if name in self.lora_magnitude_vector:
            remaining = {n: norm for n, norm in self._dora_merge_norms.items() if n != name}
            self._require_solvable(remaining, f"unmerging DoRA adapter {name!r}",
                                   "unmerge in the reverse order of merging, as lorakit.unmerge(model) does")
            # The change merge added, with the norm of then (W0 has not changed since).
            weight = self.unmerged_weight().to(delta.dtype)
            delta = self._dora_change(name, weight, delta, self._dora_merge_norms[name])
        self.add_to_weight(-delta)
        self._dora_merge_norms.pop(name, None)
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
