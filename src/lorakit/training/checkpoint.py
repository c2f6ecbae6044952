"""Checkpoints that resume bit-for-bit.

A checkpoint directory holds the adapter in PEFT's layout (usable on its own) and
``training_state.pt``: the exact trainable tensors, optimizer and scheduler state, every random
generator's state, and the position in the data (step, epoch, batch within the epoch). With the
data order derived from (seed, epoch), resuming from it continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..io import save_adapter
from ..state import adapter_configs
from .optim import optimizer_kind

STATE_FILE = "training_state.pt"
# The --optimizer choices whose state a checkpoint's optimizer_kind is.
KIND_OPTIONS = {
    "torch.AdamW": "adamw",
    "bitsandbytes.AdamW8bit": "adamw8bit (or paged_adamw8bit)",
    "bitsandbytes.AdamW": "paged_adamw",
}
# Only finished checkpoints match: ``step-N.tmp`` is one whose save was cut off.
CHECKPOINT_NAME = re.compile(r"step-(\d+)")


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


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: Position,
    adapter_name: str = "default",
    extra: dict | None = None,
    rng: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (a temp dir renamed into place); ``extra`` holds other
    training state that must resume too (e.g. AdaLoRA's importance averages). ``rng`` is the
    generators' state at ``position`` when that is not the current one (a step cut off halfway
    has drawn dropout masks that the resumed run must draw again)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if adapter_name in adapter_configs(model):  # a LoRA run's adapter, usable on its own; other methods have none
        save_adapter(model, tmp / "adapter", adapter_name)
    torch.save(
        {
            "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "optimizer_kind": optimizer_kind(optimizer),
            "scheduler": scheduler.state_dict(),
            "rng": rng or rng_state(),
            "position": vars(position),
            "extra": extra or {},
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def finished_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The finished checkpoints in ``checkpoints_dir``, oldest step first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(checkpoints_dir).glob("step-*")
        if (m := CHECKPOINT_NAME.fullmatch(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The finished checkpoint with the highest step, or None."""
    found = finished_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest finished checkpoints (``keep`` 0: none); the deleted.
    Called after a new checkpoint is in place, so the newest is never the one at risk."""
    if keep <= 0:
        return []
    old = finished_checkpoints(checkpoints_dir)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


@torch.no_grad()
def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[Position, dict]:
    """Restore trainable tensors, optimizer, scheduler and RNG state; return the data position
    and the ``extra`` state saved with it."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    _check_fits(directory, model, state["trainable"])
    # Checkpoints from before --optimizer hold torch's AdamW. Another optimizer's state would load
    # without complaint and fail (or silently restart the moments) at the first step.
    saved_kind, kind = state.get("optimizer_kind", "torch.AdamW"), optimizer_kind(optimizer)
    if saved_kind != kind:
        option = KIND_OPTIONS.get(saved_kind, "as in the run's train_config.yaml")
        raise ConfigError(
            f"checkpoint {directory} holds {saved_kind}'s state and this run's optimizer is {kind}; resume with "
            f"--optimizer {option}, or train without --resume"
        )
    try:  # before the tensors: torch checks the groups before it changes anything
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise ConfigError(
            f"checkpoint {directory} does not fit this optimizer ({exc}); resume with the run's own "
            "options (e.g. the same --loraplus-ratio), or train without --resume"
        ) from None
    params = dict(model.named_parameters())
    for name, value in state["trainable"].items():
        params[name].copy_(value)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"]), state.get("extra", {})


def _check_fits(directory: Path, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Raise before anything is copied when the checkpoint was trained with other LoRA options."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(saved) - set(trainable))
    missing = sorted(set(trainable) - set(saved))
    reshaped = sorted(n for n in set(saved) & set(trainable) if saved[n].shape != trainable[n].shape)
    if unknown or missing or reshaped:
        detail = "; ".join(
            f"{what} {names[:3]}"
            for what, names in (
                ("not in this model", unknown),
                ("not in the checkpoint", missing),
                ("other shape", reshaped),
            )
            if names
        )
        raise ConfigError(
            f"checkpoint {directory} was trained with another model or LoRA options ({detail}); "
            "resume with the run's own options (its train_config.yaml), or train without --resume"
        )
