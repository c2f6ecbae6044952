"""What a preference task reports about its pairs: rewards of chosen and rejected, accuracy, margin.

The sums run over a step's micro-batches (or an evaluation's batches) on the device, read once at
the end, so that the loop's host never waits for the GPU per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .sharding import gathered, my_batches


class PairSums:
    """Running sums over pairs of (reward chosen, reward rejected, chosen ahead, margin, pairs)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Count a batch's rewards, (B,) each."""
        c, r = chosen.detach().float(), rejected.detach().float()
        row = torch.stack([c.sum(), r.sum(), (c > r).float().sum(), (c - r).sum(), c.new_tensor(float(c.numel()))])
        self.sums = row if self.sums is None else self.sums + row

    def pop(self, accelerator=None) -> dict[str, float]:
        """Means since the last pop, summed over DDP processes: ``chosen``, ``rejected``, ``accuracy``
        (share of pairs whose chosen reward is strictly higher, TRL's rule), ``margin``; {} for none."""
        sums, self.sums = self.sums, None
        if accelerator is not None and accelerator.num_processes > 1:
            # Every process calls pop each step (the loop's step_metrics), so the collective matches.
            sums = accelerator.reduce(sums if sums is not None else torch.zeros(5, device=accelerator.device), "sum")
        if sums is None:
            return {}
        chosen, rejected, ahead, margin, n = sums.tolist()
        if not n:
            return {}
        return {"chosen": chosen / n, "rejected": rejected / n, "accuracy": ahead / n, "margin": margin / n}


@torch.no_grad()
def evaluate_pairs(
    model, examples: list[dict], collate, batch_size: int, device, accelerator, batch_stats: Callable
) -> tuple[float, dict[str, float]]:
    """(mean loss per pair, `PairSums.pop` means) of a preference task over ``examples``, in eval
    mode (restored after), every process its share of the batches under DDP.
    ``batch_stats(model, batch)`` gives (the batch's summed loss, a 0-d tensor; rewards chosen (B,),
    rejected (B,))."""
    was_training = model.training
    model.eval()
    parts = []  # (batch index, summed loss, PairSums' sums)
    try:
        for i in my_batches(math.ceil(len(examples) / batch_size), accelerator):
            chunk = examples[i * batch_size : (i + 1) * batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            loss_sum, chosen, rejected = batch_stats(model, batch)
            sums = PairSums()
            sums.add(chosen, rejected)
            parts.append((i, loss_sum, sums.sums))  # tensors: read back once, after the loop
    finally:
        model.train(was_training)
    parts = gathered([(i, float(loss), sums.tolist()) for i, loss, sums in parts], accelerator)
    total = PairSums()
    total.sums = torch.tensor([part[2] for part in parts]).sum(0) if parts else None
    n = float(total.sums[4]) if parts else 0.0
    return (sum(part[1] for part in parts) / n if n else float("nan")), total.pop()
