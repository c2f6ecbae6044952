"""Command-line flags generated from `TrainConfig`'s fields, so flags and config keys never drift.

``--max-steps 30`` sets ``max_steps``; booleans get ``--packing`` / ``--no-packing``; flags left
unset fall through to the YAML file (``--config``) and then to the dataclass defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from ..training.config import TrainConfig

HELP = {
    "data": "training data: JSONL (prompt/completion, chat messages, or text), CSV or Parquet",
    "model": "base model: built-in alias, local directory, .gguf file or hub id (offline: must be cached)",
    "variant": "lora | dora | lora-fa | dylora | vera | adalora",
    "adalora_target_r": "AdaLoRA: average rank per module left at the end (r is the initial rank)",
    "valid_data": "validation file (else --valid-ratio of the training data)",
    "valid_ratio": "fraction of the training data held out for validation",
    "output_dir": "where the adapter, metrics.jsonl, loss.png and checkpoints go",
    "target_modules": "comma-separated module names, a regex, all-linear, or none (parameters only)",
    "target_parameters": "comma-separated parameters adapted directly, one update per expert for mixture-of-experts "
                         "stacks, e.g. experts.gate_up_proj,experts.down_proj (no dropout or variant with these)",
    "loraplus_ratio": "LoRA+: learning rate of B = lr x this ratio (paper default 16)",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "save_every": "checkpoint every N steps (0: only on Ctrl-C)",
    "keep_checkpoints": "keep only the newest N checkpoints (0: keep all)",
    "resume": "continue from the latest checkpoint in output_dir",
    "mixed_precision": "no | bf16 | fp16 (GPU)",
    "dtype": "model weights dtype: auto | float32 | bfloat16 | float16",
    "init": "default | gaussian | pissa | pissa_niter_<N> (PiSSA by a randomized SVD: fast on large models) | olora",
    "compile": "torch.compile the training step (inductor). The first batch compiles, and the first of another "
               "shape once more (on a CPU minutes each for a 30-layer model, and a C++ compiler is needed)",
}
SKIP = {"extra"}
# Second spellings. ``--rank``: torchrun's parser rejects ``--r`` anywhere on its command line as an
# ambiguous prefix of its own flags (--rdzv-*, --role, ...), even after the script's name.
ALIASES = {"r": ("--rank",)}


def _type_of(default: Any, annotation: str):
    """The argparse type of a field: its annotation first (``alpha: float = 32`` takes 0.5)."""
    if isinstance(default, bool):
        return None
    if isinstance(default, float) or "float" in annotation:
        return float
    if isinstance(default, int) or ("int" in annotation and "str" not in annotation):
        return int
    return str


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; every default is None so that only given flags override."""
    for f in fields(TrainConfig):
        if f.name in SKIP:
            continue
        flags = ("--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ()))
        default = f.default if f.default is not MISSING else None
        helptext = HELP.get(f.name, "") + (f" (default: {default})" if default not in (None, "") else "")
        if isinstance(default, bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            parser.add_argument(*flags, dest=f.name, type=_type_of(default, str(f.type)), default=None, help=helptext)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in SKIP and hasattr(args, f.name)}
