"""Quantized base weights through bitsandbytes: `quantize` and the tensor-level helpers the LoRA
layers use on a 4-bit or 8-bit base.

    quantize(model, "nf4")      every nn.Linear (but the output head and ``skip``) -> bnb Linear4bit
    quantize(model, "int8")     ... -> bnb Linear8bitLt

NF4/FP4 (QLoRA, Dettmers et al. 2023) store W (d_out, d_in) as packed 4-bit codes (a uint8
tensor of shape (d_out * d_in / 2, 1)) with one absmax scale per block of 64; double quantization
stores those scales in 8 bits again (the "nested" state). int8 (LLM.int8()) stores W as int8 rows
with one scale per output row (SCB). The dense weight a LoRA layer needs (DoRA's norm, merging,
export) is always taken from bitsandbytes' own dequantize functions, so it is exactly the W the
base layer multiplies by.

This module sits at the bottom of the house (it imports only ``errors``): layers, the loader and
the CLI use it. bitsandbytes is optional (``pip install "lorakit[qlora]"``); it is imported only
when a quantized layer is met or made.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger("lorakit.quantization")

METHODS = ("nf4", "fp4", "int8")
INSTALL_HINT = 'pip install "lorakit[qlora]"'
# bitsandbytes' classes by name, so the checks below need not import it.
PARAMS_4BIT = "Params4bit"
PARAMS_8BIT = "Int8Params"


class _UnusedCpuKernelNotice(logging.Filter):
    """Drops bitsandbytes' import-time warning that its AVX512-BF16 CPU GEMM could not be fetched
    from the kernels hub: that kernel serves only the repacked bf16 layout, which lorakit switches
    off for every 4-bit layer (``keep_standard_packing``), so the advice to install it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_UnusedCpuKernelNotice())


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or a ConfigError naming the extra to install."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"quantized models need bitsandbytes, which is not installed; {INSTALL_HINT}") from None
    return bitsandbytes


# --- what a module or parameter is -----------------------------------------------------------------
def quantized_bits(module: nn.Module) -> int | None:
    """4 for a bitsandbytes Linear4bit (NF4/FP4), 8 for a Linear8bitLt, None for anything else."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == PARAMS_4BIT:
        return 4
    if kind == PARAMS_8BIT and getattr(weight, "dtype", None) == torch.int8:
        return 8
    return None


def is_quantized_parameter(param: Any) -> bool:
    """True for a bitsandbytes 4-bit parameter, or an 8-bit one holding int8 codes."""
    kind = type(param).__name__
    return kind == PARAMS_4BIT or (kind == PARAMS_8BIT and getattr(param, "dtype", None) == torch.int8)


def parameter_count(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a packed 4-bit parameter holds two codes per
    byte of its storage (PEFT counts it the same way), anything else its own elements."""
    if type(param).__name__ == PARAMS_4BIT:
        return param.numel() * 2 * param.element_size()
    return param.numel()


def quant_type(module: nn.Module) -> str:
    """ "nf4", "fp4" or "int8" for a quantized linear module."""
    if quantized_bits(module) == 8:
        return "int8"
    return module.weight.quant_type


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a quantized linear module computes in: its ``compute_dtype`` when set, else the
    dtype the weight was quantized from (4-bit), else its bias's, else float32."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "dtype", None) is not None:
        return state.dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and bias.dtype.is_floating_point else torch.float32


# --- the packed layout lorakit reads -------------------------------------------------------------
@torch.no_grad()
def keep_standard_packing(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer in the standard packed layout and its compute dtype.

    bitsandbytes (0.49 on) on a CPU with AVX512-BF16 rewrites a ``Linear4bit``'s packed weight,
    at its first forward in eval mode without gradients, into a layout only its own bf16 kernel
    reads, and from then on computes that layer in bf16 whatever its compute dtype (errors ~1e-3
    against the fp32 formula). lorakit reads the packed weight (dequantization for DoRA's norm,
    merging, export, its fused QLoRA path) and computes in fp32 on the CPU by default, so every
    4-bit layer it makes or wraps has that switched off, and a rewrite already done is undone."""
    if getattr(module, "support_avx512bf16_for_cpu", False):  # written once: this runs per dequantization
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        inverse = require_bitsandbytes().functional._convert_weight_packed_for_cpu_inverse
        weight.data, weight.quant_state = inverse(weight.data, state)


# --- dense weights from quantized ones ---------------------------------------------------------
@torch.no_grad()
def dequantized_weight(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The dense W (d_out, d_in) of a quantized linear module, by bitsandbytes' own dequantize
    (``dequantize_4bit``: in the dtype the weight was quantized from; ``int8_vectorwise_dequant``:
    float32). ``weight``: another parameter of the same kind (a kept original) instead of the
    module's."""
    bnb = require_bitsandbytes()
    if weight is None:
        keep_standard_packing(module)
        weight = module.weight
    if type(weight).__name__ == PARAMS_4BIT:
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scale.to(weight.device))


@torch.no_grad()
def quantized_like(module: nn.Module, dense: torch.Tensor) -> nn.Parameter:
    """A new frozen parameter of the module's kind (same quant type, block size, double
    quantization, storage) holding ``dense`` (d_out, d_in) quantized, on the module's device."""
    bnb = require_bitsandbytes()
    weight = module.weight
    device = weight.device
    if type(weight).__name__ == PARAMS_4BIT:
        state = weight.quant_state
        dtype = state.dtype if state is not None else dense.dtype
        return bnb.nn.Params4bit(
            dense.to("cpu", dtype),
            requires_grad=False,
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
            quant_storage=weight.quant_storage,
        ).to(device)
    param = bnb.nn.Int8Params(dense.to("cpu", torch.float16 if device.type == "cuda" else torch.float32))
    param.requires_grad_(False)
    param.has_fp16_weights = False
    return param.to(device)


def replace_weight(module: nn.Module, weight: nn.Parameter) -> None:
    """Put a quantized parameter made by ``quantized_like`` into ``module`` (int8 keeps its row
    scales in the module's state too)."""
    module.weight = weight
    if type(weight).__name__ == PARAMS_8BIT:
        module.state.SCB = weight.SCB
        module.state.CB = weight.CB


# --- quantize(): any model's linear layers ------------------------------------------------------
def resolve_compute_dtype(compute_dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or "auto": float32 on the CPU (bitsandbytes' bf16 compute is slower there), bfloat16 on
    a GPU; "bf16"/"fp16"/"fp32" or a torch dtype otherwise."""
    if compute_dtype is None or compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}
    dtype = getattr(torch, names.get(str(compute_dtype), str(compute_dtype)), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"compute_dtype must be auto, bf16, fp16 or fp32, got {compute_dtype!r}")
    return dtype


def _output_head_ids(model: nn.Module) -> set[int]:
    """The output embeddings (LM head) and any linear layer whose weight is tied to an embedding:
    kept in full precision by default, as transformers' BitsAndBytesConfig keeps them."""
    ids: set[int] = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        ids.add(id(head))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
            ids.add(id(module))
    return ids


def _skipped(path: str, skip: Sequence[str]) -> str | None:
    """The ``skip`` entry naming ``path`` (the path itself or a trailing run of its components)."""
    for entry in skip:
        if path == entry or path.endswith("." + entry):
            return entry
    return None


def quantize(
    model: nn.Module,
    method: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    skip: Sequence[str] | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a bitsandbytes quantized linear layer, in place,
    and return the model.

    ``method``: "nf4" or "fp4" (``Linear4bit``: blocks of 64 with an absmax scale; with
    ``double_quant`` the scales are quantized again) or "int8" (``Linear8bitLt``, outlier
    threshold 6.0 as transformers' BitsAndBytesConfig). ``compute_dtype``: what the 4-bit layers
    compute in; None/"auto" is float32 on the CPU, bfloat16 on a GPU. ``skip``: module paths (or
    their trailing components, e.g. "lm_head" or "mlp.down_proj") kept in full precision; the
    output head and linear layers tied to an embedding are always kept. Each layer is quantized on
    the device its weight is on, one layer at a time (peak memory: the model plus one layer).

    Raises ConfigError for an unknown method or dtype, a ``skip`` entry that names no linear
    layer, a model that already carries LoRA layers, or bitsandbytes missing.
    """
    if method not in METHODS:
        raise ConfigError(f"quantization method must be one of {', '.join(METHODS)}, got {method!r}")
    bnb = require_bitsandbytes()
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    if any(hasattr(module, "lora_A") for module in model.modules()):
        raise ConfigError(
            "this model already carries LoRA layers; quantize the base model first, then add or load adapters"
        )
    heads = _output_head_ids(model)
    linears = [(path, m) for path, m in model.named_modules() if type(m) is nn.Linear]
    unused = [entry for entry in skip if not any(_skipped(path, [entry]) for path, _ in linears)]
    if unused:
        raise ConfigError(f"skip entries {unused} name no linear layer of this model; check the module paths")
    count = 0
    for path, module in linears:
        if id(module) in heads or _skipped(path, skip):
            continue
        device = module.weight.device
        if device.type == "meta":
            raise ConfigError(f"module {path!r} has no weights yet (meta device); load the weights, then quantize")
        dtype = resolve_compute_dtype(compute_dtype, device)
        new = _quantized_linear(bnb, module, method, double_quant, dtype)
        new.train(module.training)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
        count += 1
    if count == 0:
        log.warning("quantize(%s) found no linear layer to quantize", method)
    model._lorakit_quantization = {"method": method, "double_quant": double_quant}
    if count:
        # The flags transformers sets on a model loaded with BitsAndBytesConfig: PEFT reads them to
        # wrap the layers with its bitsandbytes LoRA classes (its QLoRA), so a model quantized
        # here is the same model to PEFT as one loaded quantized.
        model.is_loaded_in_4bit = method != "int8"
        model.is_loaded_in_8bit = method == "int8"
    log.info("quantized %d linear layers to %s%s", count, method, " (double quantization)" if double_quant else "")
    return model


@torch.no_grad()
def _quantized_linear(bnb: Any, module: nn.Linear, method: str, double_quant: bool, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding ``module``'s weight and bias (quantized on its device)."""
    device = module.weight.device
    has_bias = module.bias is not None
    if method == "int8":
        new = bnb.nn.Linear8bitLt(
            module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        weight = bnb.nn.Int8Params(module.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=has_bias,
            compute_dtype=dtype,
            compress_statistics=double_quant,
            quant_type=method,
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            module.weight.data.to("cpu"),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=method,
        )
    new.weight = weight.to(device)  # moving it to its device is what quantizes it
    keep_standard_packing(new)
    if method == "int8":
        new.state.SCB, new.state.CB = new.weight.SCB, new.weight.CB
    if has_bias:
        new.bias = nn.Parameter(module.bias.data, requires_grad=module.bias.requires_grad)
    return new


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Make every bitsandbytes quantized linear layer of ``model`` dense, in place; returns the
    model. A plain one becomes an ``nn.Linear`` holding its dequantized weight
    (``dequantized_weight``); a LoRA layer over one keeps its adapters over that dense weight
    (``LoraQuantizedLinear.densify``: outputs unchanged, merging exact from then on). ``dtype``:
    default each layer's compute dtype ("bf16", "fp32", a torch dtype otherwise)."""
    count = 0
    modules = dict(model.named_modules())
    for path, module in list(modules.items()):
        parent = modules.get(path.rpartition(".")[0]) if "." in path else model
        if getattr(module, "quantized", False) and hasattr(module, "densify"):  # a LoRA layer's own
            module.densify(None if dtype is None else resolve_compute_dtype(dtype, module.base_weight.device))
            count += 1
            continue
        if quantized_bits(module) is None or hasattr(parent, "lora_A"):
            continue
        target = compute_dtype_of(module) if dtype is None else resolve_compute_dtype(dtype, module.weight.device)
        dense = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device=module.weight.device
        ).to(target)
        dense.weight.data.copy_(dequantized_weight(module))
        dense.weight.requires_grad_(False)
        if module.bias is not None:
            dense.bias.data.copy_(module.bias.data)
            dense.bias.requires_grad_(module.bias.requires_grad)
        dense.train(module.training)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, dense)
        count += 1
    for key in ("_lorakit_quantization", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(key, None)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # loaded with BitsAndBytesConfig: transformers' markers go too (.to, saving)
        quantizer.remove_quantization_config(model)
    log.info("dequantized %d linear layers", count)
    return model


@torch.no_grad()
def quantization_error(weight: torch.Tensor, method: str, double_quant: bool = True) -> float:
    """‖W − dequantize(quantize(W))‖ / ‖W‖ for a dense weight (d_out, d_in) and ``method``: what a
    model quantized that way loses on this weight."""
    bnb = require_bitsandbytes()
    dense = weight.detach().float()
    if method == "int8":
        codes, scales = bnb.functional.int8_vectorwise_quant(dense.half() if dense.is_cuda else dense)[:2]
        back = bnb.functional.int8_vectorwise_dequant(codes, scales).float()
    else:
        codes, state = bnb.functional.quantize_4bit(dense, quant_type=method, compress_statistics=double_quant)
        back = bnb.functional.dequantize_4bit(codes, state).float()
    norm = float(dense.norm())
    return float((dense - back).norm()) / norm if norm > 0 else 0.0
