"""The fused LoRA/DoRA path against the reference forward: values and gradients, every strategy."""

import copy
import io

import pytest
import torch
from torch import nn

import lorakit
from lorakit.kernels import dispatch, tuning

from .tiny import adapted_llama, model_loss_and_grads, randomize_adapters, tiny_llama


class Net(nn.Module):
    def __init__(self, d_in=24, d_out=20, bias=True, dtype=torch.float64):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def adapted(dtype=torch.float64, bias=True, **config):
    net = Net(bias=bias, dtype=dtype)
    config = {"r": 4, "alpha": 8, "target_modules": ["lin"], **config}
    lorakit.add_adapter(net, lorakit.LoraConfig(**config))
    randomize_adapters(net, 0.3)
    if net.lin.variants["default"].name == "dora":  # DoRA: a magnitude that differs from the norm
        with torch.no_grad():
            net.lin.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, 20, dtype=dtype))
    return net.train()


@pytest.fixture(params=["factored", "merged"])
def strategy(request, monkeypatch):
    # MERGE_RATIO 0: every call merges; infinity: none does.
    monkeypatch.setattr(tuning, "MERGE_RATIO", 0.0 if request.param == "merged" else float("inf"))
    return request.param


def run(net, x, fast: bool, seed: int = 0):
    """Output and the gradients of a fixed loss w.r.t. x and every trainable parameter."""
    lorakit.set_fast_path(net, fast)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    out = net(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {"x": x.grad}
    for name, p in net.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad
            p.grad = None
    return out.detach(), grads


def assert_same(net, x, rtol=1e-10, atol=1e-10):
    fast_out, fast_grads = run(net, x, True)
    ref_out, ref_grads = run(net, x, False)
    torch.testing.assert_close(fast_out, ref_out, rtol=rtol, atol=atol)
    assert fast_grads.keys() == ref_grads.keys()
    for key in ref_grads:
        torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=rtol, atol=atol, msg=key)


def spy_calls(monkeypatch):
    """Count calls that took the fused path."""
    calls = []
    original = dispatch._apply

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(dispatch, "_apply", counting)
    return calls


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"lora_fa": True},
        {"bias": "all"},
        {"use_dora": True},
        {"adalora": True},
        {"init": "pissa"},
    ],
    ids=["lora", "rslora", "lora-fa", "bias", "dora", "adalora", "pissa"],
)
def test_fast_matches_reference_float64(strategy, config, monkeypatch):
    net = adapted(**config)
    calls = spy_calls(monkeypatch)
    assert_same(net, torch.randn(3, 5, 24, dtype=torch.float64))
    assert len(calls) == 1  # the fused path ran (once: the reference run does not call it)


def test_fast_matches_reference_with_dropout(strategy, monkeypatch):
    net = adapted(dropout=0.3)
    calls = spy_calls(monkeypatch)
    assert_same(net, torch.randn(6, 24, dtype=torch.float64))
    assert len(calls) == 1
    # Different masks give different outputs: dropout really is applied on the fused path.
    a, _ = run(net, torch.ones(6, 24, dtype=torch.float64), True, seed=1)
    b, _ = run(net, torch.ones(6, 24, dtype=torch.float64), True, seed=2)
    assert not torch.allclose(a, b)


def test_fast_matches_reference_without_bias_and_unbatched(strategy):
    net = adapted(bias=False)
    assert_same(net, torch.randn(24, dtype=torch.float64))


def test_dylora_nested_rank_on_fast_path(strategy):
    net = adapted(dylora=True, r=6)
    net.lin.nested_rank["default"] = 3
    assert_same(net, torch.randn(4, 24, dtype=torch.float64))


def test_fast_matches_reference_float32(strategy):
    net = adapted(dtype=torch.float32)
    assert_same(net, torch.randn(8, 24), rtol=1e-5, atol=1e-5)
    dora = adapted(dtype=torch.float32, use_dora=True)
    assert_same(dora, torch.randn(8, 24), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_within_rounding_of_float64_formula(strategy, use_dora):
    """In bf16 the fused path is as close to the exact (float64) result as the reference path is."""
    exact = adapted(use_dora=use_dora)
    low = adapted(use_dora=use_dora).to(torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in exact.state_dict().items()})
    x = torch.randn(32, 24, dtype=torch.float64)
    exact_out, exact_grads = run(exact, x, False)
    errors = {}
    for fast in (True, False):
        out, grads = run(low, x.to(torch.bfloat16), fast)
        scale = exact_out.abs().max()
        errors[fast] = [((out.double() - exact_out).abs().max() / scale).item()]
        for key, g in exact_grads.items():
            errors[fast].append(((grads[key].double() - g).abs().max() / g.abs().max()).item())
    for fast_err, ref_err in zip(errors[True], errors[False]):
        assert fast_err < max(3 * ref_err, 2**-7), errors


def test_autocast_uses_fast_path_and_matches_reference(monkeypatch):
    net = adapted(dtype=torch.float32)
    calls = spy_calls(monkeypatch)
    x = torch.randn(8, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_out, fast_grads = run(net, x, True)
        ref_out, ref_grads = run(net, x, False)
    assert len(calls) == 1 and fast_out.dtype == torch.bfloat16
    torch.testing.assert_close(fast_out, ref_out, rtol=2e-2, atol=2e-2)
    for key in ref_grads:
        assert fast_grads[key].dtype == ref_grads[key].dtype
        torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_llama_loss_and_all_gradients_match(strategy, dropout):
    model = tiny_llama().double()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=dropout))
    randomize_adapters(model, 0.1)
    model.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    fast_loss, fast_grads = model_loss_and_grads(model, ids, True)
    ref_loss, ref_grads = model_loss_and_grads(model, ids, False)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    "case", ["two-active", "vera", "row-routing", "merged", "dtype-mismatch", "disabled", "trainable-base"]
)
def test_reference_path_where_fused_does_not_apply(case, monkeypatch):
    """The fused path steps aside (and results stay right) whenever it does not cover the case."""
    if case == "vera":
        net = Net()
        lorakit.add_adapter(net, lorakit.LoraConfig(r=4, target_modules=["lin"], use_vera=True))
    else:
        net = adapted(adapter_dtype="float32") if case == "dtype-mismatch" else adapted()  # fp32 A, B on fp64
    if case == "two-active":
        lorakit.add_adapter(net, lorakit.LoraConfig(r=2, target_modules=["lin"]), name="other")
        lorakit.set_adapter(net, ["default", "other"])
    calls = spy_calls(monkeypatch)
    x = torch.randn(3, 24, dtype=torch.float64)
    if case == "row-routing":
        with lorakit.adapter_batch(net, ["default", None, "default"]):
            net(x)
    elif case == "merged":
        lorakit.merge(net)
        net(x)
    elif case == "disabled":
        with lorakit.disable_adapters(net):
            torch.testing.assert_close(net(x), net.lin.base_layer(x))
    else:
        if case == "trainable-base":
            net.lin.base_layer.weight.requires_grad_(True)
        net(x)
    assert calls == []


def test_fp32_adapters_on_bf16_base_use_fast_path(monkeypatch):
    """fp32 adapters (PEFT's default) on a bf16 base: computed in bf16, gradients back in fp32."""
    net = adapted(dtype=torch.float32)
    net.lin.base_layer.to(torch.bfloat16)
    calls = spy_calls(monkeypatch)
    x = torch.randn(8, 24, dtype=torch.bfloat16)
    fast_out, fast_grads = run(net, x, True)
    ref_out, ref_grads = run(net, x, False)
    assert len(calls) == 1
    assert fast_grads["lin.lora_A.default"].dtype == torch.float32
    torch.testing.assert_close(fast_out, ref_out, rtol=2e-2, atol=2e-2)
    for key in ref_grads:
        torch.testing.assert_close(fast_grads[key].float(), ref_grads[key].float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("merge_forward,merge_backward", [(True, False), (False, True)])
def test_mixed_directions_match_formula(merge_forward, merge_backward):
    """Forward and backward may each merge or not (the dispatcher picks per direction)."""
    from lorakit.kernels import LoraLinearFunction

    gen = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 7, 12), (9, 12), (9,)))
    A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((3, 12), (9, 3)))
    leaves = [t.requires_grad_(True) for t in (x, b, A, B)]
    out = LoraLinearFunction.apply(x, None, W, b, A, B, 1.5, merge_forward, merge_backward)
    expected = x @ W.T + b + 1.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), leaves)
    want = torch.autograd.grad((expected * weights).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "use_dora,act", [(False, "silu"), (True, "silu"), (False, "gelu_pytorch_tanh")], ids=["lora", "dora", "lora-gelu"]
)
def test_gated_mlp_is_fused_and_matches_reference(strategy, use_dora, act, monkeypatch):
    """Llama's MLP runs as one fused function (h recomputed in backward) with the same results."""
    from lorakit.kernels.gated_mlp import GatedMlpFunction
    from lorakit.patching import gated_mlp

    model = adapted_llama(use_dora, act=act)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.forward, gated_mlp.FusedOrOriginalForward)
    applied = []
    original = GatedMlpFunction.apply
    monkeypatch.setattr(GatedMlpFunction, "apply", lambda *a: applied.append(1) or original(*a))
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    fast_out, fast_grads = run(mlp, x, True)
    ref_out, ref_grads = run(mlp, x, False)
    assert applied == [1]
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-10, atol=1e-10)
    for key in ref_grads:
        torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=1e-10, atol=1e-10, msg=key)
    copied = copy.deepcopy(model)  # the instance forward follows its own module
    assert copied.model.layers[0].mlp.forward.mlp is copied.model.layers[0].mlp
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert isinstance(
        torch.load(buffer, weights_only=False).model.layers[0].mlp.forward, gated_mlp.FusedOrOriginalForward
    )
    lorakit.unload(model)
    assert "forward" not in mlp.__dict__


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gated_mlp_is_fused_under_autocast(use_dora, monkeypatch):
    """fp32 weights under bf16 autocast (mixed-precision training): one fused call in bf16, the
    reference path's values and gradients within bf16 rounding, fp32 gradients for fp32 A and B
    (and DoRA's magnitudes)."""
    from lorakit.kernels.gated_mlp import GatedMlpFunction

    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    randomize_adapters(model, 0.1)
    model.train()
    mlp = model.model.layers[0].mlp
    applied = []
    original = GatedMlpFunction.apply
    monkeypatch.setattr(GatedMlpFunction, "apply", lambda *a: applied.append(a[0].dtype) or original(*a))
    x = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_out, fast_grads = run(mlp, x, True)
        ref_out, ref_grads = run(mlp, x, False)
    assert applied == [torch.bfloat16] and fast_out.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(fast_out, ref_out, rtol=2e-2, atol=2e-2)
    for key in ref_grads:
        assert fast_grads[key].dtype == ref_grads[key].dtype == torch.float32
        torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=5e-2, atol=5e-2, msg=key)


@pytest.mark.parametrize("act", ["silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"])
def test_fused_mlp_gate_product_and_its_gradients_are_autograds(act):
    """h = act(g) ⊙ u recomputed in backward, and (∂g, ∂u): aten's silu_backward for SiLU,
    autograd for other activations (the GPU's Triton kernels: tests/test_triton_swiglu.py)."""
    from transformers.activations import ACT2FN

    from lorakit.kernels.gated_mlp import GateProduct, is_plain_silu

    module = ACT2FN[act]
    assert is_plain_silu(module) == (act in ("silu", "swish"))
    g, u, dh = (torch.randn(5, 8, dtype=torch.float64) for _ in range(3))
    g.requires_grad_(True), u.requires_grad_(True)
    expected_h = module(g) * u
    expected = torch.autograd.grad(expected_h, (g, u), dh)
    gate = GateProduct(module, g.detach(), u.detach())
    torch.testing.assert_close(gate.h, expected_h.detach(), rtol=1e-14, atol=1e-14)
    for got, want in zip(gate.backward(dh.clone()), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gated_mlp_detection_is_by_code():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mistral.modeling_mistral import MistralMLP

    from lorakit.patching.gated_mlp import is_gated_mlp_class

    assert is_gated_mlp_class(LlamaMLP) and is_gated_mlp_class(MistralMLP)
    assert not is_gated_mlp_class(GPT2MLP) and not is_gated_mlp_class(nn.Linear)


def test_dora_norm_follows_base_weight_changes(strategy):
    """DoRA's norm follows in-place writes to the base weight."""
    net = adapted(use_dora=True)
    x = torch.randn(5, 24, dtype=torch.float64)
    assert_same(net, x)
    with torch.no_grad():
        net.lin.base_layer.weight.mul_(1.5).add_(0.1)
    assert_same(net, x)


def test_merge_directions_follow_the_traffic_rule():
    """Forward merges when N > 2 d_in, backward when N > 2 d_out (dispatch.py's docstring)."""
    assert dispatch.merge_directions(8192, 2048, 8192) == (True, False)  # gate/up of the 1B benchmark
    assert dispatch.merge_directions(8192, 8192, 2048) == (False, True)  # down
    assert dispatch.merge_directions(1, 2048, 2048) == (False, False)  # generation never merges


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fused_mlp_keeps_less_for_backward_than_the_layers_do(use_dora):
    """The memory the fused MLP is for: it does not keep h = act(g) * u (nor act(g)) for backward,
    DoRA projections included (they keep their outputs for ∂m: g and u anyway, y besides)."""
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 8, 32, requires_grad=True)

    def saved_bytes(fast):
        lorakit.set_fast_path(mlp, fast)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x)
        params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in params)

    hidden = 3 * 8 * 64 * 4  # one (N, d_ff) fp32 tensor
    assert saved_bytes(True) <= saved_bytes(False) - 2 * hidden


def test_merged_backward_reuses_the_forwards_merged_weight(monkeypatch):
    """Both directions merged: W0 + sBA is built once per step (kept between forward and backward)."""
    from lorakit.kernels import lora_linear
    from lorakit.kernels.lora_linear import LoraLinearFunction

    builds = []
    original = lora_linear.merged_weight
    monkeypatch.setattr(lora_linear, "merged_weight", lambda *a, **k: builds.append(1) or original(*a, **k))
    gen = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(6, 5), (3, 5), (6, 3)])
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    out = LoraLinearFunction.apply(x, None, W, None, A, B, 0.5, True, True)
    out.backward(torch.ones_like(out))
    assert len(builds) == 1
    full = W + 0.5 * B @ A
    torch.testing.assert_close(out, x @ full.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, torch.ones_like(out) @ full, rtol=1e-12, atol=1e-12)


def test_merged_dora_backward_reuses_the_forwards_scaled_weight(monkeypatch):
    """DoRA with both directions merged: c ⊙ (W0 + sBA) is built in the forward only."""
    from lorakit.kernels import dora_linear
    from lorakit.kernels.dora_linear import DoraLinearFunction

    rebuilds = []
    original = dora_linear.merged_weight
    monkeypatch.setattr(dora_linear, "merged_weight", lambda *a, **k: rebuilds.append(1) or original(*a, **k))
    gen = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(6, 5), (3, 5), (6, 3)])
    m = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = DoraLinearFunction.apply(x, W, None, A, B, m, 0.5, True, True)
    out.backward(torch.ones_like(out))
    assert rebuilds == []
    full = W + 0.5 * B @ A
    scaled = (m / full.norm(dim=1))[:, None] * full
    torch.testing.assert_close(out, x @ scaled.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, torch.ones_like(out) @ scaled, rtol=1e-12, atol=1e-12)
