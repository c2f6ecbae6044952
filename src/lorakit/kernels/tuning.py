"""The fast path's tuning knobs, in one place.

Each knob picks between computations that give the same values; only speed and memory change.
The kernels read them as attributes of this module at every call (``tuning.MERGE_RATIO``), so a
benchmark or a test sets one for a run with ``tuning.MERGE_RATIO = ...`` (or pytest's
``monkeypatch.setattr(tuning, "MERGE_RATIO", ...)``) and it takes effect at the next call. Their
effects are measured in docs/benchmarks.md and compared with ``bench/kernel_ab.py``. A Triton
kernel's tile sizes stay beside the kernel, whose code they are tuned with.
"""

from __future__ import annotations

import os

MERGE_RATIO = 1.0
"""Scales the token counts beyond which a fused call multiplies by the merged weight W0 + sBA
instead of adding the low-rank term to the output (``dispatch.py``'s docstring: forward from
N > 2 d_in, backward from N > 2 d_out, DoRA's own counts). It trades the (d_out, d_in) build of
the merged weight against traffic over the (N, d) activations. 0: always merge; ``float("inf")``:
never (``bench/train_step.py --merge-ratio``)."""

KEEP_MERGED = True
"""Keep a merged forward's W0 + sBA for a merged backward (LoRA and DoRA, ``lora_linear.py``):
one weight-sized matrix per such layer held between the passes, for two to four fewer passes
over it. False: build it again in backward."""

STACK_PROJECTIONS = True
"""Projections of one input (q/k/v, the MLP's gate and up) share one x·Aᵀ GEMM in forward and one
∂A GEMM in backward with their A stacked (``projection.py``): each skinny GEMM costs a read of x
whatever its rank. False: one GEMM per projection each way."""

TRITON_MERGE = os.environ.get("LORAKIT_TRITON_MERGE", "auto")
"""Which merged-weight builds take the Triton kernel on a GPU (``triton_merge.py``): "auto" (the
default) DoRA's builds and LoRA's large ones (``LARGE_LORA_BUILD``), "1" every build, "0" none.
It trades a Triton launch's host time against passes over W0. Read from the environment variable
``LORAKIT_TRITON_MERGE`` when lorakit is imported."""

LARGE_LORA_BUILD = 2**23
"""Elements of a plain LoRA weight (8192 × 2048 and up: an MLP's projections) from which "auto"
builds W0 + sBA with the Triton kernel: below it a Triton launch costs more host time than the
GPU time it saves over torch's copy and K = r GEMM."""

TRITON_COLSUM = True
"""DoRA's magnitude gradient Σ g ⊙ out by the Triton column-sum kernel on a GPU
(``triton_colsum.py``; one pass over g and out). False: the torch expression."""

BGMV_TOKENS = 256
"""Token count up to which a multi-adapter call on a GPU takes the Triton BGMV kernels
(``triton_bgmv.py``: one program per token, the slot's factors read per token) instead of SGMV
(``multi_lora.py``: tokens sorted by slot, grouped GEMMs that read each slot's factors once).
Decode batches are launch- and latency-bound, where BGMV's two launches win; long prefills
re-read the factors per token, where grouped GEMMs win."""

GROUPED_MM = True
"""SGMV through ``torch.nn.functional.grouped_mm`` where it runs (fp32/bf16/fp16, 16-byte strides).
False: one GEMM pair per slot present (``multi_lora._per_slot``), for comparison."""

SEGMENT_TOKENS = 64
"""Average run length (consecutive tokens of one slot) from which SGMV multiplies the tokens where
they lie, one group per run with that run's factors gathered (``multi_lora._grouped_segments``),
instead of sorting the tokens by slot (a gather of x and a scatter-add of the result, each a pass
over an (N, d) activation, per layer). A prefill's rows are runs of their prompt's length; decode
rows are runs of one token. ``float("inf")``: always sort."""

TRITON_DEQUANT = os.environ.get("LORAKIT_TRITON_DEQUANT", "0") == "1"
"""True: the fused QLoRA path dequantizes 4-bit weights on a GPU with lorakit's Triton kernel into
a shared buffer (``triton_dequant4.py``). False (the default): bitsandbytes' ``dequantize_4bit``
(the same values in bf16). On an H100 the kernel took 0.51–0.76× bitsandbytes' time per weight,
but whole QLoRA steps were the same either way (within 1%, docs/benchmarks.md): a 4-bit layer's
dequantization is launch-bound at these sizes, so the kernel stays an option, not the default.
Read from ``LORAKIT_TRITON_DEQUANT`` when lorakit is imported."""

BGMV_ONE_LAUNCH: bool | str = {"1": True, "0": False}.get(os.environ.get("LORAKIT_BGMV_ONE_LAUNCH", ""), "auto")
"""How a BGMV call launches (``triton_bgmv``). True: one Triton launch (``_one_launch_kernel``:
each program computes its token's rank-r shrink, then expands it over its share of the output
units; the token's programs all repeat the shrink). False: a shrink launch and an expand launch,
the rank-r intermediate in global memory. "auto" (the default): one launch in eager calls, whose
launches cost host time, two in a CUDA graph (``graph_mode``), where they cost none and the repeated
shrink is what is left (the two measured in docs/benchmarks.md, "Decode in CUDA graphs"). Read
from ``LORAKIT_BGMV_ONE_LAUNCH`` ("1" or "0") when lorakit is imported."""

BATCHED_ROWS = True
"""A prefill's rows (each row's T tokens one slot, T >= ``SEGMENT_TOKENS``) take two batched GEMMs
per call (``multi_lora._batched_rows``: the shrink per row, then the expand accumulated into the
output with beta = 1) instead of grouped GEMMs over runs, which write the product apart and add it
in another pass over the output. Base rows multiply slot 0's zeros. False: SGMV over runs.
Neutral on the CPU (docs/benchmarks.md); not yet timed on a GPU (case ``lorakit-pool-runs``)."""

LORA_FIRST = True
"""A prefill's batched rows on a pool's lean path (``LoraLinear.slots_only``, no bias, no DoRA
slot) write their adapters' product into a new output first and the base GEMM accumulates onto it
(``multi_lora.lora_then_base``: ``addmm_`` with beta = 1, the output read inside the GEMM, which
a prefill's arithmetic keeps busy), instead of the base GEMM writing the output and the expand
reading and writing it again (``_batched_rows``'s ``baddbmm_``). False: base first."""

SHARED_SIBLINGS = True
"""Projections that a model calls on one input (attention's q, k, v; an MLP's gate and up), served
from a pool's slots, share their multi-adapter work (``layers/slot_siblings.py``): in a decode
batch on a GPU BGMV's two launches (``triton_bgmv.sibling_bgmv``: each launch is a CUDA graph node
whatever its work); in a prefill's rows one shrink GEMM with their A stacked (one read of x,
``multi_lora.siblings_then_base``). False: each projection alone."""

SLOT_MLP = True
"""A gated MLP (Llama's, Mistral's, ...) whose three projections serve a pool's slots runs on a GPU
as one fused pass over its (N, d_ff) activations (``slot_mlp.py``: the gate's and the up's expands,
the SiLU gate and the down projection's shrink in one Triton kernel), for a prefill's rows and for
decode batches, instead of its layers one by one: those write and read a prefill's activations four
more times, and make a decode step three more launches. It carries the gate's and the up's shared
call further, so ``SHARED_SIBLINGS`` off turns it off too (as do ``BATCHED_ROWS`` and ``LORA_FIRST``
off for a prefill's rows). False: the layers one by one (each through ``LoraLinear.slots_only``)."""
