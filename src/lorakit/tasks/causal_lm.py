"""Causal-LM fine-tuning (``task="causal-lm"``, the default): the model's own next-token loss.

This is the behaviour the loop had before tasks existed, kept as it was: the same loss (read from
the model's ``.loss``), the same evaluation (loss, perplexity, exact match), hence the same
metrics and checkpoints.
"""

from __future__ import annotations

from .base import Task


class CausalLM(Task):
    name = "causal-lm"

    def prepare_data(self, tokenizer):
        # Looked up at call time: run.prepare_data is the data path (and the seam tests replace).
        from ..training import run

        return run.prepare_data(self.cfg, tokenizer)

    def evaluate(self, model, tokenizer, examples, collate, pairs, cfg, device, accelerator, progress):
        from ..training.evaluate import evaluate

        return evaluate(
            model,
            tokenizer,
            examples,
            collate,
            batch_size=cfg.batch_size,
            pairs=pairs,
            max_examples=cfg.eval_max_examples,
            max_new_tokens=cfg.max_new_tokens,
            device=device,
            accelerator=accelerator,
            progress=progress,
        )
