"""DoRA's rescale without building W0 + sBA, the cache of ||W0||², and when DoRA merges."""

import gc

import pytest
import torch

from lorakit.kernels import dispatch, dora_norm
from lorakit.kernels.dora_linear import DoraLinearFunction


def factors(d_out=9, d_in=12, r=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W, A, B = (torch.randn(*shape, generator=gen, dtype=dtype) for shape in ((d_out, d_in), (r, d_in), (d_out, r)))
    m = torch.rand(d_out, generator=gen, dtype=dtype) + 0.5
    return W, A, B, m


def test_factored_rescale_is_the_formula_float64():
    W, A, B, m = factors()
    want = m / torch.linalg.vector_norm(W + 1.7 * B @ A, dim=1)
    torch.testing.assert_close(dora_norm.factored_rescale(W, A, B, 1.7, m), want, rtol=1e-12, atol=1e-12)


def test_factored_rescale_in_bf16_is_within_rounding():
    W, A, B, m = factors(d_out=64, d_in=96, r=8)
    A, B = A * 0.1, B * 0.1  # LoRA's regime: the change is small next to W0
    want = m / torch.linalg.vector_norm(W + 2.0 * B @ A, dim=1)
    low = [t.to(torch.bfloat16) for t in (W, A, B)]
    got = dora_norm.factored_rescale(*low, 2.0, m.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0)


@pytest.mark.parametrize("merge_forward,merge_backward", [(False, False), (True, False), (False, True), (True, True)])
def test_dora_function_every_direction_matches_formula(merge_forward, merge_backward):
    """Merged and factored, each direction, against the float64 formula (norm detached)."""
    W, A, B, m = factors()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(9, generator=gen, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, b, A, B, m)]
    out = DoraLinearFunction.apply(x, W, b, A, B, m, 1.5, merge_forward, merge_backward)
    merged = W + 1.5 * B @ A
    expected = (m / torch.linalg.vector_norm(merged, dim=1).detach()) * (x @ merged.T) + b
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), leaves)
    want = torch.autograd.grad((expected * weights).sum(), leaves)
    for name, g, w in zip(("x", "b", "A", "B", "m"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11, msg=name)


def test_base_norms_are_cached_recomputed_on_change_and_dropped_with_the_weight():
    W = torch.nn.Parameter(factors()[0], requires_grad=False)
    first = dora_norm.base_row_norms_squared(W)
    assert dora_norm.base_row_norms_squared(W) is first  # cached: W0 is not read again
    torch.testing.assert_close(first, (W * W).sum(1), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        W.mul_(2.0)  # an in-place write bumps the version
    torch.testing.assert_close(dora_norm.base_row_norms_squared(W), 4 * first, rtol=1e-12, atol=1e-12)
    W.data = W.data.clone()[:, :6].contiguous()  # new storage and shape
    torch.testing.assert_close(dora_norm.base_row_norms_squared(W), (W * W).sum(1), rtol=1e-12, atol=1e-12)
    key = id(W)
    assert key in dora_norm._ROW_NORMS
    del W
    gc.collect()
    assert key not in dora_norm._ROW_NORMS  # no entry outlives its weight


def test_dora_merge_rule():
    """GPU (Triton build): training batches merge as before; CPU training batches stay factored."""
    assert dispatch.dora_merge_directions(8192, 2048, 8192, fused_build=True) == (True, True)  # 1B gate/up
    assert dispatch.dora_merge_directions(8192, 8192, 2048, fused_build=True) == (True, True)  # 1B down
    assert dispatch.dora_merge_directions(512, 576, 576, fused_build=False) == (False, False)  # CPU benchmark
    assert dispatch.dora_merge_directions(512, 1536, 576, fused_build=False) == (False, False)
    assert dispatch.dora_merge_directions(1, 2048, 2048, fused_build=True) == (False, False)  # generation
    assert dispatch.dora_merge_directions(4096, 576, 576, fused_build=False) == (True, True)  # long CPU batch


def test_only_parameters_are_kept():
    """A tensor made for one call (autocast's cast of the weight) is not kept: nothing reuses it."""
    W = factors()[0]
    before = len(dora_norm._ROW_NORMS)
    torch.testing.assert_close(dora_norm.base_row_norms_squared(W), (W * W).sum(1), rtol=1e-12, atol=1e-12)
    assert len(dora_norm._ROW_NORMS) == before


@pytest.mark.parametrize("autocast", [False, True])
def test_dora_under_inference_mode(autocast):
    """Inference tensors have no version counter: the factored path must not ask for one
    (pipelines run under torch.inference_mode, often with autocast)."""
    import lorakit

    net = torch.nn.Sequential(torch.nn.Linear(16, 16))
    lorakit.add_adapter(net, lorakit.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = net(x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = net(x)
    torch.testing.assert_close(got.float(), want, rtol=2e-2 if autocast else 1e-6, atol=2e-2 if autocast else 1e-6)
