"""Checkpoints that resume bit-for-bit.

A checkpoint directory holds the adapter in PEFT's layout (usable on its own) and
``training_state.pt``: the exact trainable tensors, optimizer and scheduler state, every random
generator's state, and the position in the data (step, epoch, batch within the epoch). With the
data order derived from (seed, epoch), resuming from it continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import save_adapter

STATE_FILE = "training_state.pt"


@dataclass
class Position:
    """Where training stands: ``step`` optimizer steps done, in ``epoch``, after ``batch`` batches."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, position: Position,
                    adapter_name: str = "default", extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (a temp dir renamed into place); ``extra`` holds other
    training state that must resume too (e.g. AdaLoRA's importance averages)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp / "adapter", adapter_name)
    torch.save({
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "position": vars(position),
        "extra": extra or {},
    }, tmp / STATE_FILE)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = sorted(p for p in Path(checkpoints_dir).glob("step-*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


@torch.no_grad()
def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> tuple[Position, dict]:
    """Restore trainable tensors, optimizer, scheduler and RNG state; return the data position
    and the ``extra`` state saved with it."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise ValueError(f"checkpoint {directory} does not fit this model/config (unknown tensors {missing[:3]})")
    for name, value in state["trainable"].items():
        params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"]), state.get("extra", {})
