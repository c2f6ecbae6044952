"""Evaluation under DDP: which batches this process evaluates, and everyone's results gathered
(shared by every task's evaluation; accelerate does the gathering)."""

from __future__ import annotations


def my_batches(n_batches: int, accelerator) -> range:
    """The batch indices this process evaluates: all of them, or every world-th under DDP."""
    if accelerator is None or accelerator.num_processes == 1:
        return range(n_batches)
    return range(accelerator.process_index, n_batches, accelerator.num_processes)


def gathered(parts: list[tuple], accelerator) -> list[tuple]:
    """Every process's ``(batch index, ...)`` tuples, in batch order."""
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    return sorted(parts, key=lambda part: part[0])
