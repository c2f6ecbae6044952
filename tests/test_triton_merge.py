"""The Triton merged-weight kernels, run in Triton's CPU interpreter, against the torch formula.

The interpreter computes with numpy, which has no bfloat16: fp32 and fp16 are checked here, bf16
on a GPU by scripts/gpu_fast_path_check.py."""

import os
import subprocess
import sys

import pytest

from .triton_interpreter import run_interpreted

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from lorakit.kernels import triton_merge

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
    for d_out, d_in, r in ((70, 150, 4), (33, 300, 16), (20, 64, 24)):
        W, A, B = torch.randn(d_out, d_in), torch.randn(r, d_in) * 0.1, torch.randn(d_out, r) * 0.1
        m = torch.rand(d_out) + 0.5
        s = 1.7
        exact = W.double() + s * B.double() @ A.double()
        Wd, Ad, Bd = (t.to(dtype) for t in (W, A, B))
        merged = triton_merge.merged_weight(Wd, Ad, Bd, s)
        exact_low = Wd.double() + s * Bd.double() @ Ad.double()
        assert merged.dtype == dtype and merged.shape == W.shape
        err = ((merged.double() - exact_low).abs().max() / exact_low.abs().max()).item()
        assert err < tol, ("merged", dtype, d_out, d_in, r, err)
        c = torch.rand(d_out) + 0.5
        scaled = triton_merge.merged_weight(Wd, Ad, Bd, s, row_scale=c)
        err = ((scaled.double() - c.double()[:, None] * exact_low).abs().max() / exact_low.abs().max()).item()
        assert err < 2 * tol, ("row scale", dtype, err)
        dora, rescale = triton_merge.dora_weight(Wd, Ad, Bd, s, m.to(dtype))
        want_scale = m.to(dtype).double() / exact_low.norm(dim=1)
        assert rescale.dtype == torch.float32
        assert ((rescale.double() - want_scale).abs() / want_scale).max().item() < tol, ("dora scale", dtype)
        err = ((dora.double() - want_scale[:, None] * exact_low).abs().max() / exact_low.abs().max()).item()
        assert err < 2 * tol, ("dora", dtype, err)
print("ok")
"""


def test_kernels_match_formula_in_interpreter():
    run_interpreted(SCRIPT)


def test_cpu_tensors_never_take_the_kernel():
    import torch

    from lorakit.kernels import triton_merge

    assert not triton_merge.available(torch.zeros(2, 2), dora=True)
    assert not triton_merge.available(torch.zeros(2, 2), dora=False)


@pytest.mark.parametrize(
    "mode, for_dora, for_small_lora, for_large_lora",
    [("auto", True, False, True), ("1", True, True, True), ("0", False, False, False)],
)
def test_which_builds_take_the_kernel(monkeypatch, mode, for_dora, for_small_lora, for_large_lora):
    """The default ("auto") sends DoRA's builds and LoRA's large ones to the kernel; "1" every
    build, "0" none."""
    from types import SimpleNamespace

    import torch

    from lorakit.kernels import triton_merge, tuning

    def gpu_weight(elements):  # only what available() reads
        return SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, numel=lambda: elements)

    large, small = tuning.LARGE_LORA_BUILD, tuning.LARGE_LORA_BUILD - 1
    monkeypatch.setattr(tuning, "TRITON_MERGE", mode)
    assert triton_merge.available(gpu_weight(small), dora=True) is for_dora
    assert triton_merge.available(gpu_weight(small), dora=False) is for_small_lora
    assert triton_merge.available(gpu_weight(large), dora=False) is for_large_lora
    assert not triton_merge.available(
        SimpleNamespace(is_cuda=True, dtype=torch.float64, numel=lambda: large), dora=True
    )


def test_the_default_mode_is_auto():
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_TRITON_MERGE"}
    code = "from lorakit.kernels import tuning; print(tuning.TRITON_MERGE)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "auto", result.stderr[-2000:]
