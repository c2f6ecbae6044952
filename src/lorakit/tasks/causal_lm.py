"""Causal-LM fine-tuning (``task="causal-lm"``, the default): the model's own next-token loss.

This is the behaviour the loop had before tasks existed, kept as it was: the same loss (read from
the model's ``.loss``), the same data path and evaluation (loss, perplexity, exact match), which
the training package runs when a task leaves them to it (``Task.prepare_data`` / ``evaluate``
return None), hence the same metrics and checkpoints.
"""

from __future__ import annotations

from .base import Task


class CausalLM(Task):
    name = "causal-lm"
