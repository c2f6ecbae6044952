"""`RowRouting`: which batch rows go to which adapter during ``adapter_batch``.

Built once per ``adapter_batch`` block and shared by every LoRA layer and saved-module wrapper,
so the row groups (and their index tensors on each device) are computed once, not per layer.
"""

from __future__ import annotations

import torch

from ..errors import AdapterStateError


class RowRouting:
    """Row i of the batch uses adapter ``names[i]`` (None: the base model alone)."""

    def __init__(self, names: list[str | None]) -> None:
        self.names = names
        self._rows = {name: [i for i, row in enumerate(names) if row == name] for name in dict.fromkeys(names)}
        self._on_device: dict[torch.device, dict[str | None, torch.Tensor]] = {}

    def groups(self, batch: int, device: torch.device) -> dict[str | None, torch.Tensor]:
        """Adapter name -> index tensor of its rows on ``device``, in first-seen order."""
        if batch != len(self.names):
            raise AdapterStateError(
                f"adapter_batch was given {len(self.names)} adapter names but the batch has {batch} rows; "
                "pass one name (or None) per row"
            )
        if device not in self._on_device:
            self._on_device[device] = {n: torch.tensor(rows, device=device) for n, rows in self._rows.items()}
        return self._on_device[device]
