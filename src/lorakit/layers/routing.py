"""`RowRouting`: which batch rows go to which adapter during a routed forward.

A row is served by name (``names[i]``: an adapter loaded into the model, run by each layer's
per-row loop or by a stack of those adapters built on the fly: ``lorakit.adapter_batch``) or by
slot (``slots[i]``: a slot of the layers' ``SlotStack``s, filled by the serving pool), or by
neither (the base model). A row never has both, so nothing is added twice.

One object is shared by every LoRA layer and saved-module wrapper, so what depends only on the
rows (their groups, the token plans of the multi-adapter kernels, and their index tensors on each
device) is computed once per forward, not per layer. The serving pool installs one object for
good and changes its rows before each forward with ``set_rows``, without walking the model.
"""

from __future__ import annotations

import torch

from ..errors import AdapterStateError
from ..kernels.host_copy import host_to_device
from ..kernels.multi_lora import SlotPlan


class RowRouting:
    """Row i uses adapter ``names[i]`` (None: none by name) and slot ``slots[i]`` (0: none).

    ``num_slots``: S of the layers' slot stacks (needed when ``slots`` are given)."""

    def __init__(self, names: list[str | None], slots: list[int] | None = None, num_slots: int | None = None) -> None:
        self.set_rows(names, slots, num_slots)

    def set_rows(self, names: list[str | None], slots: list[int] | None = None, num_slots: int | None = None) -> None:
        """Route the next forward's rows: ``names`` and optionally ``slots``, one entry per row."""
        if slots is not None:
            if len(slots) != len(names):
                raise AdapterStateError(f"{len(names)} adapter names but {len(slots)} slots; give one of each per row")
            if num_slots is None:
                raise AdapterStateError("slots need num_slots, the size of the layers' slot stacks")
            both = [i for i, (n, s) in enumerate(zip(names, slots)) if n is not None and s]
            if both:
                raise AdapterStateError(f"rows {both[:5]} have both an adapter name and a slot; give one of them")
        self.names = list(names)
        self.slots = list(slots) if slots is not None and any(slots) else None
        self.num_slots = num_slots
        self._rows = {n: [i for i, row in enumerate(self.names) if row == n] for n in dict.fromkeys(self.names)}
        # Distinct names of the rows, numbered from 1 in first-seen order: the slot numbering of
        # the stacks a layer builds of its named adapters (``LoraLinear``).
        self.stack_names = tuple(n for n in self._rows if n is not None)
        self._on_device: dict[torch.device, dict[str | None, torch.Tensor]] = {}
        self._plans: dict[tuple[str, int, int, torch.device], SlotPlan] = {}
        self._fixed: SlotPlan | None = None

    def set_plan(self, plan: SlotPlan, rows: int) -> None:
        """Route the following forwards of ``rows`` rows by ``plan`` (slots only, no names) until
        the next ``set_rows``: a CUDA graph's plan (``SlotPlan.for_graph``), captured once and
        steered by the slots written into its buffer."""
        self.set_rows([None] * rows)
        self.num_slots = plan.num_slots
        self._fixed = plan

    def _check(self, batch: int) -> None:
        if batch != len(self.names):
            raise AdapterStateError(
                f"adapter_batch was given {len(self.names)} adapter names but the batch has {batch} rows; "
                "pass one name (or None) per row"
            )

    def groups(self, batch: int, device: torch.device) -> dict[str | None, torch.Tensor]:
        """Adapter name -> index tensor of its rows on ``device``, in first-seen order."""
        self._check(batch)
        if device not in self._on_device:
            self._on_device[device] = {n: host_to_device(rows, device) for n, rows in self._rows.items()}
        return self._on_device[device]

    def slot_plan(self, batch: int, tokens: int, device: torch.device) -> SlotPlan | None:
        """The kernels' plan for the rows' slots over ``tokens`` tokens (``tokens / batch`` per
        row), or None when no row has a slot."""
        self._check(batch)
        if self._fixed is not None:
            if tokens != self._fixed.tokens:
                raise AdapterStateError(f"the fixed slot plan covers {self._fixed.tokens} tokens, not {tokens}")
            return self._fixed
        if self.slots is None:
            return None
        key = ("slots", batch, tokens, device)
        if key not in self._plans:
            self._plans[key] = SlotPlan.for_rows(self.slots, tokens // batch, self.num_slots, device)
        return self._plans[key]

    def name_plan(self, batch: int, tokens: int, device: torch.device) -> SlotPlan:
        """The kernels' plan with row i in slot ``stack_names.index(names[i]) + 1`` (0 for None)."""
        self._check(batch)
        key = ("names", batch, tokens, device)
        if key not in self._plans:
            number = {name: k + 1 for k, name in enumerate(self.stack_names)}
            rows = [number.get(name, 0) if name is not None else 0 for name in self.names]
            self._plans[key] = SlotPlan.for_rows(rows, tokens // batch, len(self.stack_names) + 1, device)
        return self._plans[key]
