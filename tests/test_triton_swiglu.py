"""The fused MLP's SiLU-gate kernels, run in Triton's CPU interpreter, against the float64 formula.

The interpreter computes with numpy, which has no bfloat16: fp32 and fp16 are checked here, bf16
on a GPU by scripts/gpu_fast_path_check.py (through the whole model)."""

import pytest
import torch

from lorakit.kernels import triton_swiglu

from .triton_interpreter import run_interpreted

SCRIPT = r"""
import torch
import torch.nn.functional as F
from lorakit.kernels import triton_swiglu

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
    for shape in ((3, 5), (70, 300), (1, 2049)):  # sizes around and past one block
        g, u, dh = (torch.randn(*shape, dtype=torch.float64) * 3 for _ in range(3))
        g.requires_grad_(True), u.requires_grad_(True)
        h = F.silu(g) * u
        dg_want, du_want = torch.autograd.grad(h, (g, u), dh)
        gl, ul, dhl = (t.detach().to(dtype) for t in (g, u, dh))
        got_h = triton_swiglu.silu_mul(gl, ul)
        buffer = dhl.clone()
        dg, du = triton_swiglu.silu_mul_backward(buffer, gl, ul)
        assert dg.data_ptr() == buffer.data_ptr(), "dg is written over dh"
        for name, got, want in (("h", got_h, h), ("dg", dg, dg_want), ("du", du, du_want)):
            assert got.dtype == dtype and got.shape == want.shape, name
            scale = want.abs().max().item()
            error = (got.double() - want.detach()).abs().max().item() / scale
            assert error < tol, (dtype, shape, name, error)
print("ok")
"""


@pytest.mark.skipif(triton_swiglu.triton is None, reason="Triton not installed")
def test_kernels_match_formula_in_interpreter():
    run_interpreted(SCRIPT)


def test_not_available_on_cpu_tensors():
    g = torch.randn(4, 8)
    assert not triton_swiglu.available(g, g.clone())
