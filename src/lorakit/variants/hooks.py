"""`TrainingHooks`: what a variant does around the training loop's steps.

A variant whose training is more than "backward, optimizer step" (AdaLoRA's rank allocator,
DyLoRA's sampled rank) returns one of these from ``Variant.trainer``; the loop
(``training/loop.py``) calls every adapter's hooks at fixed points and knows no variant by name.
Each hook defaults to doing nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch


class TrainingHooks:
    """Hooks of one adapter's variant in one training run; override what the variant needs.

    Attributes:
        name: the adapter's name.
        checkpoint_key: where ``state_dict`` goes in a checkpoint's ``extra`` (``extra[key][name]``);
            None when the hooks keep no state across steps.
        compile_note: a warning to log when the steps are compiled (torch.compile), or None.
    """

    checkpoint_key: str | None = None
    compile_note: str | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    def before_step(self, step: int) -> None:
        """Before the micro-batches of optimizer step ``step`` (0-based)."""

    def loss_term(self) -> torch.Tensor | None:
        """A term added to each micro-batch's loss (scaled by 1 / grad_accum as the loss is)."""
        return None

    def after_backward(self) -> None:
        """After the step's last backward, before gradients are clipped and applied."""

    def after_step(self, step: int) -> None:
        """After the optimizer applied step ``step``."""

    def abandon_step(self) -> None:
        """The step under way was interrupted: undo per-step state (called instead of after_step)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, out_dir: Path, write: bool) -> str | None:
        """Training is over: write result files into ``out_dir`` if ``write`` (the main process of
        a run); returns a line for the user (the CLI prints it), or None."""
        return None
