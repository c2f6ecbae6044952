"""`load_model`: a base model and its tokenizer, by alias, .gguf file, local directory or hub id."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelNotFoundError
from .aliases import ALIASES, DEFAULT_MODEL

log = logging.getLogger("lorakit.models")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TASKS = ("causal-lm", "sequence-classification")


def resolve_device(device: str | None) -> str:
    """``None`` -> "cuda" when a GPU is available, else "cpu"."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``"auto"``/None: fp32 on CPU; bf16 on GPUs that support it, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_source(name_or_path: str) -> str:
    """A local directory to load from (converting aliases and .gguf files), or the hub id itself."""
    from .gguf import cached_gguf_file, cached_wheel_model

    if name_or_path in ALIASES:
        return str(cached_wheel_model(ALIASES[name_or_path]))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found")
        return str(cached_gguf_file(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json: not a transformers model")
        return str(path)
    return name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = "auto", device: str | None = None,
               task: str = "causal-lm", gradient_checkpointing: bool = False, **model_kwargs: Any):
    """Load ``(model, tokenizer)``.

    ``name_or_path`` is a built-in alias (``smollm2-135m``: the offline default), a ``.gguf``
    file, a local transformers directory, or a hub id (loaded from the local hub cache; there is no
    network at run time). The tokenizer always has a pad token (EOS when it had none).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_source(name_or_path)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = auto.from_pretrained(source, dtype=torch_dtype, **model_kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"model {name_or_path!r} was not found locally and cannot be downloaded (no network at run time). "
            f"Use a built-in alias ({', '.join(ALIASES)}), a local directory, or a .gguf file. ({exc})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach adapters even though the (frozen)
        # embedding output does not require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("loaded %s (%s) on %s as %s", name_or_path, type(model).__name__, device, torch_dtype)
    return model, tokenizer
