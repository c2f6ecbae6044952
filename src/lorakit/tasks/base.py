"""`Task`: the seam between the training loop and what is being learned.

A task reads and tokenizes its data, says how the model is loaded and which modules train besides
the adapter, computes a batch's loss, counts its tokens and evaluates. The defaults are those of
causal-LM fine-tuning, where the model computes its own loss; a task overrides what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class PreparedData:
    """A run's tokenized examples (train, validation), the validation prompts and answers for
    exact match, the collate function and the data's statistics."""

    train: list[dict]
    valid: list[dict]
    valid_pairs: list[tuple[str, str]]
    collate: Any
    stats: Any


class Task:
    """One kind of training run; see the module docstring. Instances hold one run's state."""

    name = ""
    #: the ``task`` argument of `lorakit.models.load_model`
    model_task = "causal-lm"
    #: whether ``TrainConfig.labels`` (``--labels``) applies: the task predicts named classes
    uses_labels = False
    #: PEFT's ``task_type`` of the adapters this task trains (adapter_config.json)
    peft_task_type = "CAUSAL_LM"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `load_model` (read before the model loads, e.g. label counts)."""
        return {}

    def prepare_model(self, model: nn.Module, tokenizer) -> None:
        """Make a loaded model (the caller's or train()'s) ready for this task; raise if it cannot be."""

    def lora_config(self, model: nn.Module, config):
        """The adapter's LoraConfig for ``model`` (e.g. a classification head in modules_to_save)."""
        return config

    def activate(self, model: nn.Module, name: str) -> None:
        """The run's adapter ``name`` was just added, the only one active: make what trains run
        (DPO with a reference adapter: both, only ``name`` trainable)."""

    def prepare_data(self, tokenizer) -> PreparedData | None:
        """The run's `PreparedData`; None: the records read and tokenized as causal-LM training
        reads them (``lorakit.training.run.prepare_data``)."""
        return None

    def loss(self, forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of one micro-batch through ``forward`` (the possibly wrapped model)."""
        return forward(**batch).loss

    def step_metrics(self, accelerator) -> dict[str, float]:
        """Extra numbers for this optimizer step's metrics.jsonl line (beside ``loss``), from the
        micro-batches ``loss`` saw since the last call, which starts the next step's count. Called
        once per step on every process (under DDP a task may reduce across them)."""
        return {}

    def tokens(self, host_batch: dict[str, torch.Tensor]) -> int:
        """Tokens of a host batch, for the tokens-per-second rate."""
        return int(host_batch["attention_mask"].sum())

    def evaluate(self, model: nn.Module, tokenizer, examples, collate, pairs, cfg, device, accelerator, progress):
        """Metrics on ``examples``; must hold ``"loss"`` (early stopping and save_best compare it).
        None: causal-LM evaluation (loss, perplexity, exact match; ``lorakit.training.evaluate``)."""
        return None

    def save(self, out_dir: Path) -> None:
        """Write what the run needs beside the adapter (e.g. the label order)."""
