"""Attention's q, k, v projections in one fused call (patching/attention_siblings.py): same values and
gradients as separate layers (float64), and every case where sharing would be wrong runs alone."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lorakit
from lorakit.kernels import tuning
from lorakit.kernels.sibling_projections import SiblingProjectionsFunction
from lorakit.patching import attention_siblings

from .tiny import adapted_llama, model_loss_and_grads


@pytest.fixture(params=["factored", "merged"])
def strategy(request, monkeypatch):
    monkeypatch.setattr(tuning, "MERGE_RATIO", 0.0 if request.param == "merged" else float("inf"))
    return request.param


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = SiblingProjectionsFunction.apply
    monkeypatch.setattr(SiblingProjectionsFunction, "apply", lambda *a: calls.append(a[0].dtype) or original(*a))
    return calls


def qkv_outputs_and_grads(attention, x, fast: bool, use=("q_proj", "k_proj", "v_proj")):
    """Call the projections named in ``use`` on x as attention does, then backward a fixed loss."""
    lorakit.set_fast_path(attention, fast)
    x = x.detach().clone().requires_grad_(True)
    inputs = x * 1.0  # a non-leaf, as attention's input is
    outputs = {name: getattr(attention, name)(inputs) for name in use}
    loss = sum(
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum() for out in outputs.values()
    )
    loss.backward()
    grads = {"x": x.grad}
    for name, p in attention.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad
            p.grad = None
    return {k: v.detach() for k, v in outputs.items()}, grads


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_qkv_share_one_call_with_the_layers_values_and_gradients(strategy, use_dora, fused_calls):
    model = adapted_llama(use_dora)
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    fast_out, fast_grads = qkv_outputs_and_grads(attention, x, True)
    assert len(fused_calls) == 1
    ref_out, ref_grads = qkv_outputs_and_grads(attention, x, False)
    assert len(fused_calls) == 1
    for name in ref_out:
        torch.testing.assert_close(fast_out[name], ref_out[name], rtol=1e-12, atol=1e-12)
    assert fast_grads.keys() == ref_grads.keys()
    for key in ref_grads:
        torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    "config",
    [
        {"rank_pattern": {"k_proj": 2, "up_proj": 3}, "bias": "all"},
        {"lora_fa": True},
        {"use_dora": True, "rank_pattern": {"v_proj": 2}},
    ],
    ids=["unequal-ranks-and-biases", "lora-fa", "dora"],
)
def test_whole_model_matches_and_calls_once_per_layer(strategy, config, fused_calls):
    """Stacked A (one GEMM for the x A_iᵀ, one for the ∂A_i) with unequal ranks, frozen A
    (LoRA-FA: no ∂A, so no stacked ∂A) and DoRA, in attention and in the fused MLP."""
    model = adapted_llama(**config)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    fast_loss, fast_grads = model_loss_and_grads(model, ids, True)
    assert len(fused_calls) == len(model.model.layers)
    ref_loss, ref_grads = model_loss_and_grads(model, ids, False)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_an_unused_sibling_gets_no_gradient(fused_calls):
    model = adapted_llama()
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    fast_out, fast_grads = qkv_outputs_and_grads(attention, x, True, use=("q_proj", "k_proj"))
    ref_out, ref_grads = qkv_outputs_and_grads(attention, x, False, use=("q_proj", "k_proj"))
    assert len(fused_calls) == 1
    assert fast_grads["v_proj.lora_A.default"] is None and ref_grads["v_proj.lora_A.default"] is None
    for key in ref_grads:
        if ref_grads[key] is not None:
            torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=1e-10, atol=1e-12, msg=key)
    assert attention.v_proj.siblings.kept.keys() == {2}  # v's output, kept until the next call drops it


def test_an_input_changed_in_place_is_computed_again(fused_calls):
    """k and v see the input after the change, as separate layers would. (Inference only: a
    change in place of an input saved for backward breaks any layer's backward.)"""
    model = adapted_llama()
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, dtype=torch.float64)

    def outputs(fast):
        lorakit.set_fast_path(attention, fast)
        inputs, result = x.clone(), []
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                result.append(getattr(attention, name)(inputs))
                inputs.mul_(2.0)
        return result

    fast, ref = outputs(True), outputs(False)
    assert len(fused_calls) == 3  # each call found its kept output stale
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_another_input_or_a_pre_hook_runs_the_layer_alone(fused_calls):
    model = adapted_llama()
    attention = model.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    q = attention.q_proj(x)
    k = attention.k_proj(other)  # not what q's call computed for k
    assert len(fused_calls) == 2
    lorakit.set_fast_path(attention, False)
    torch.testing.assert_close(k, attention.k_proj(other), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q, attention.q_proj(x), rtol=1e-12, atol=1e-12)
    lorakit.set_fast_path(attention, True)
    handle = attention.k_proj.register_forward_pre_hook(lambda module, args: (args[0] * 3.0,))
    k = attention.k_proj(x)
    assert len(fused_calls) == 2  # a pre-hook may change a sibling's input: no sharing
    handle.remove()
    torch.testing.assert_close(k, attention.k_proj(x * 3.0), rtol=1e-12, atol=1e-12)


def test_bf16_autocast_gives_fp32_gradients_within_rounding(fused_calls):
    model = adapted_llama(dtype=torch.float32)
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_out, fast_grads = qkv_outputs_and_grads(attention, x, True)
        ref_out, ref_grads = qkv_outputs_and_grads(attention, x, False)
    assert fused_calls == [torch.bfloat16]
    for name in ref_out:
        assert fast_out[name].dtype == ref_out[name].dtype == torch.bfloat16
        torch.testing.assert_close(fast_out[name], ref_out[name], rtol=2e-2, atol=2e-2)
    for key in ref_grads:
        if ref_grads[key] is None:  # o_proj, not called here
            assert fast_grads[key] is None
            continue
        assert fast_grads[key].dtype == ref_grads[key].dtype
        torch.testing.assert_close(fast_grads[key], ref_grads[key], rtol=3e-2, atol=3e-2, msg=key)


def test_groups_follow_copies_and_go_with_unload():
    model = adapted_llama()
    attention = model.model.layers[0].self_attn
    group = attention.q_proj.siblings
    assert group is attention.k_proj.siblings is attention.v_proj.siblings
    assert group.layers == (attention.q_proj, attention.k_proj, attention.v_proj)
    copied = copy.deepcopy(model).model.layers[0].self_attn
    assert copied.q_proj.siblings.layers == (copied.q_proj, copied.k_proj, copied.v_proj)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).model.layers[0].self_attn
    assert loaded.v_proj.siblings.layers[2] is loaded.v_proj
    lorakit.unload(model)
    assert not any("siblings" in module.__dict__ for module in model.modules())


def test_detection_is_by_code():
    class SharedInput(nn.Module):
        def forward(self, hidden_states):
            return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    class OtherInputs(nn.Module):
        def forward(self, hidden_states, memory):
            return self.q_proj(hidden_states), self.k_proj(memory), self.v_proj(memory)  # cross-attention

    assert attention_siblings.calls_siblings_on_one_input(SharedInput)
    assert not attention_siblings.calls_siblings_on_one_input(OtherInputs)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_through_the_shared_calls(use_reentrant, fused_calls):
    """transformers' gradient checkpointing runs each layer's forward again in backward: the
    shared q/k/v call is recomputed with it, and the gradients are those without checkpointing."""
    model = adapted_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    want_loss, want_grads = model_loss_and_grads(model, ids, False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    loss, grads = model_loss_and_grads(model, ids, True)
    assert len(fused_calls) == 2 * len(model.model.layers)  # forward, then again in backward
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-9, atol=1e-12, msg=name)


class GemmCounter:
    """Counts the matrix products (mm / addmm / addmm_) torch runs inside the ``with`` block."""

    GEMMS = {"mm", "addmm", "addmm_"}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += func.overloadpacket.__name__ in GemmCounter.GEMMS
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_projections_of_one_input_share_their_skinny_gemms(block, monkeypatch):
    """The stacking is there: the k projections of one input (q/k/v: 3, gate/up: 2) get their
    x Aᵀ from one GEMM in the forward and their ∂A from one GEMM in backward, so a forward and
    backward runs 2 (k - 1) GEMMs fewer than with ``tuning.STACK_PROJECTIONS`` off (values equal)."""
    monkeypatch.setattr(tuning, "MERGE_RATIO", float("inf"))  # factored: every rank-r GEMM runs
    model = adapted_llama()
    layer = model.model.layers[0]
    module, siblings = (layer.self_attn, 3) if block == "attention" else (layer.mlp, 2)
    x = torch.randn(2, 5, 32, dtype=torch.float64)

    def run(stack):
        monkeypatch.setattr(tuning, "STACK_PROJECTIONS", stack)
        inputs = x.clone().requires_grad_(True)
        with GemmCounter() as counter:
            if block == "attention":
                shared = inputs * 1.0  # one non-leaf input for the three, as attention's
                out = sum(getattr(module, name)(shared).sum() for name in ("q_proj", "k_proj", "v_proj"))
            else:
                out = module(inputs).sum()
            out.backward()
        return counter.count, inputs.grad

    stacked, stacked_grad = run(True)
    separate, separate_grad = run(False)
    assert separate - stacked == 2 * (siblings - 1)
    torch.testing.assert_close(stacked_grad, separate_grad, rtol=1e-12, atol=1e-12)
