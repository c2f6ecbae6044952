"""Choosing the device and dtype a model is loaded with."""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> str:
    """``None``/"auto" -> "cuda" when a GPU is available, else "cpu"; anything else is kept."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def parse_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or a ConfigError saying what devices look like."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


def require_device(device: str) -> None:
    """Raise ConfigError unless torch can use ``device`` on this machine.

    Checked before a model is loaded: otherwise a typo ("gpu") or a missing GPU only shows up as a
    torch error from ``model.to`` after the whole model (maybe a half-minute conversion) is loaded.
    """
    parsed = parse_device(device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: no CUDA GPU is available here; use device='cpu' (or 'auto')")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(
                f"device {device!r} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here; use device='cpu' (or 'auto')")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The torch dtype to load weights in.

    ``None``/"auto": float32 on CPU (CPU matmuls in half precision are slow and lossy), bfloat16 on
    GPUs that compute in it natively (same range as float32, so no loss scaling is needed; the GPU
    asked for, e.g. "cuda:1"), else float16 (LoRA adapters then stay float32: see
    ``LoraConfig.adapter_dtype``).
    Strings may be "float32"/"fp32", "bfloat16"/"bf16" or "float16"/"fp16"; torch dtypes pass through.
    "auto" for a GPU this machine lacks raises ConfigError (see ``require_device``).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            require_device(device)  # asking a missing GPU about bf16 would raise torch's own error
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32
    if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
        raise ConfigError(f"dtype must be auto, a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype.lower()]


def native_bf16(device: str | torch.device | None = None) -> bool:
    """True when CUDA GPU ``device`` ("cuda:1"; "cuda" or None: the current one) computes in
    bfloat16 in hardware (compute capability >= 8.0, or ROCm).

    Not ``torch.cuda.is_bf16_supported()``: it asks about the current GPU only, and (unless told
    ``including_emulation=False``, which older torch lacks) also says yes for GPUs that only emulate
    bfloat16 (V100, T4), where it runs several times slower than float16."""
    if torch.version.hip:
        return True  # what torch's own check answers for every ROCm GPU
    index = None if device is None else parse_device(device).index
    return torch.cuda.is_available() and torch.cuda.get_device_capability(index)[0] >= 8


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for ``dtype`` in the installed transformers.

    transformers 4.56 renamed ``torch_dtype`` to ``dtype``; older versions would silently ignore
    ``dtype`` and load in fp32.
    """
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
