"""Whether the calls on this thread are being recorded into a CUDA graph (its warm-up included).

A kernel that launches one way in eager calls and another inside a graph (``triton_bgmv``: one
launch eagerly, where each launch costs host time; two in a graph, where launches cost nothing)
must take its graph form in the graph's warm-up calls too: the warm-up is where Triton compiles
and loads what the capture then launches, and loading a module while a stream captures can be
refused. ``serve/cuda_graph.py`` wraps warm-up and capture in ``building_cuda_graph()``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


@contextlib.contextmanager
def building_cuda_graph() -> Iterator[None]:
    """Marks this thread's calls inside as a CUDA graph's warm-up or capture."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def in_cuda_graph(tensor: torch.Tensor) -> bool:
    """True inside ``building_cuda_graph()``, or while the current CUDA stream captures (for a
    CUDA tensor)."""
    if getattr(_state, "active", False):
        return True
    return tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
