"""`CapturedCall`: a function of fixed-shape tensors captured once in a CUDA graph, then replayed.

A decode step launches a few hundred small kernels (every layer's projections, norms, attention,
and with adapters a BGMV launch per adapted projection); on a GPU their launch time from Python
exceeds the work. A CUDA graph records the launches once and replays them in one call, as vLLM
does for its decode steps. What a graph needs of the captured function:

- fixed shapes and fixed input tensors: the inputs live in buffers owned here; a call copies the
  new values into them and replays;
- no host decisions that depend on values: the mixed-adapter kernels route by a slot buffer
  (``SlotPlan.for_graph``, installed by ``AdapterPool.fix_slots``), never by slots on the host;
- tensors it reads (weights, slot stacks, caches) keep their storage: whatever reallocates them
  must capture again (``AdapterPool.layout_version``).

The outputs are the graph's own tensors, overwritten by the next replay: copy what must outlive it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.graph_mode import building_cuda_graph


class CapturedCall:
    """``fn(**inputs)`` captured on ``inputs``' device (CUDA) after ``warmup`` eager calls.

    The tensors of ``inputs`` become the graph's input buffers (not copied: a slot buffer that
    the routing reads must be the one given here), so the caller must not reuse them.

    Attributes:
        inputs: name -> the buffer the graph reads.
        output: what ``fn`` returned during capture (its tensors are rewritten by each replay).
    """

    def __init__(self, fn: Callable[..., object], inputs: dict[str, torch.Tensor], warmup: int = 2) -> None:
        devices = {t.device for t in inputs.values()}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"a CUDA graph needs every input on one CUDA device; got {sorted(map(str, devices))}")
        self.inputs = dict(inputs)  # the graph's buffers from now on: kept alive here
        # Warm-up on a side stream, as torch's capture recipe asks: lazy initialisations (cuBLAS
        # handles, Triton compilation, cached index tensors) happen before capture.
        # building_cuda_graph: kernels that launch differently in a graph do so in the warm-up too.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), building_cuda_graph():
            for _ in range(warmup):
                fn(**self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter pool's reader thread may pin host memory meanwhile, which a
        # global capture would refuse.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), building_cuda_graph():
            self.output = fn(**self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> object:
        """Copy ``inputs`` (any subset of the names, same shapes) into the buffers and replay."""
        for name, value in inputs.items():
            self.inputs[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output
