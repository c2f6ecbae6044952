"""What the Triton kernels share: the optional import and the dtypes they are written for.

The CPU build of torch comes without Triton, so ``triton`` (and ``tl``) are None there and every
kernel module falls back to torch expressions that compute the same values.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = tl = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def on_gpu_in_kernel_dtype(tensor: torch.Tensor) -> bool:
    """True when Triton is importable and ``tensor`` is a CUDA tensor of a kernel dtype."""
    return triton is not None and tensor.is_cuda and tensor.dtype in KERNEL_DTYPES


_SM_COUNTS: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """The GPU's multiprocessors (1 off a GPU: Triton's interpreter runs on CPU tensors), what the
    kernels size their grids by. A plain dict, not functools.lru_cache, which torch.compile warns
    about and traces through."""
    if device not in _SM_COUNTS:
        on_gpu = device.type == "cuda"
        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
    return _SM_COUNTS[device]


def split_evenly(length: int, parts: int, block: int) -> tuple[int, int]:
    """(span, parts): ``length`` cut into about ``parts`` spans of whole ``block``-wide tiles, how
    a kernel shares one dimension among its programs; the count comes back as the spans make it
    (at least one: a span of ``block`` for an empty length)."""
    span = max(block, triton.cdiv(triton.cdiv(length, parts), block) * block)
    return span, max(1, triton.cdiv(length, span))


def rank_block(rank: int) -> int:
    """The tile a rank is padded to (with zeros): a power of two, 16 at least (``tl.dot``'s K and N)."""
    return max(16, triton.next_power_of_2(rank))
