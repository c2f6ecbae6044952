"""DoRA's magnitude-gradient kernel (column sums of g ⊙ (out − b)), run in Triton's CPU
interpreter, against the float64 formula; and the torch path it stands in for.

The interpreter computes with numpy, which has no bfloat16: fp32 and fp16 are checked here, bf16
on a GPU by scripts/gpu_fast_path_check.py."""

import pytest
import torch

from lorakit.kernels import triton_colsum
from lorakit.kernels.dora_linear import magnitude_grad

from .triton_interpreter import run_interpreted

SCRIPT = r"""
import torch
from lorakit.kernels import triton_colsum

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    # rows not a multiple of the row block, columns not a multiple of the column block, one column,
    # one row slice and several (the interpreter's launch shape uses the row count alone)
    for rows, cols in ((70, 300), (257, 128), (5, 1), (1000, 33)):
        g, out, b = torch.randn(rows, cols), torch.randn(rows, cols), torch.randn(cols)
        gd, od, bd = (t.to(dtype) for t in (g, out, b))
        scale = (gd.double().abs() * (od.double() - bd.double()).abs()).sum(0).max()
        want = (gd.double() * (od.double() - bd.double())).sum(0)
        got = triton_colsum.column_dot(gd, od, bd)
        assert got.dtype == torch.float32 and got.shape == (cols,)
        assert ((got.double() - want).abs().max() / scale).item() < tol, ("bias", dtype, rows, cols)
        want = (gd.double() * od.double()).sum(0)
        got = triton_colsum.column_dot(gd, od)
        assert ((got.double() - want).abs().max() / scale).item() < tol, ("no bias", dtype, rows, cols)
    # strided rows (a column slice of a wider tensor) are read in place
    wide_g, wide_o = torch.randn(40, 96).to(dtype), torch.randn(40, 96).to(dtype)
    got = triton_colsum.column_dot(wide_g[:, 10:70], wide_o[:, 10:70])
    want = (wide_g[:, 10:70].double() * wide_o[:, 10:70].double()).sum(0)
    assert (got.double() - want).abs().max().item() < 1e-3, ("strided", dtype)
print("ok")
"""


@pytest.mark.skipif(triton_colsum.triton is None, reason="needs triton (a dev dependency on Linux x86_64)")
def test_kernel_matches_formula_in_interpreter():
    run_interpreted(SCRIPT)


def test_cpu_tensors_take_the_torch_path():
    assert not triton_colsum.available(torch.zeros(2, 2))


def test_magnitude_grad_is_the_formula_and_zero_where_m_is_zero():
    torch.manual_seed(1)
    g, out = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    m = torch.rand(6, dtype=torch.float64) + 0.5
    m[2] = 0.0
    want = (g * (out - b)).sum(0) / m
    want[2] = 0.0
    torch.testing.assert_close(magnitude_grad(g, out, b, m)[0], want, rtol=1e-12, atol=1e-12)
    want = (g * out).sum(0) / m
    want[2] = 0.0
    torch.testing.assert_close(magnitude_grad(g, out, None, m)[0], want, rtol=1e-12, atol=1e-12)


def test_compiled_graphs_take_the_torch_expression(monkeypatch):
    """Under torch.compile the kernel is not used (inductor fuses the torch expression itself, and
    the kernel's launch-shape memo broke the graph in every DoRA layer on a GPU): a GPU tensor
    takes it in eager code only."""
    monkeypatch.setattr(triton_colsum, "on_gpu_in_kernel_dtype", lambda tensor: True)

    def kernel_taken(g):
        return g * (2.0 if triton_colsum.available(g) else 3.0)

    g = torch.ones(4, 2)
    assert kernel_taken(g)[0, 0].item() == 2.0
    compiled = torch.compile(kernel_taken, backend="eager", fullgraph=True)
    assert compiled(g)[0, 0].item() == 3.0
