"""The fused QLoRA path (``kernels/quantized_lora.py``, ``kernels/triton_dequant4.py``) and the
packed layout lorakit keeps (``quantization.keep_standard_packing``).

Real bitsandbytes on the CPU: the fused function against the reference path (the bitsandbytes
layer plus the adapter modules) and against the float64 formula; the Triton dequantization in
Triton's CPU interpreter against bitsandbytes' ``dequantize_4bit``, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.kernels import quantized_lora
from lorakit.layers import LoraQuantizedLinear
from lorakit.quantization import dequantized_weight, keep_standard_packing
from lorakit.state import lora_layers
from tests.tiny import randomize_adapters, tiny_llama

from .triton_interpreter import run_interpreted

bnb = pytest.importorskip("bitsandbytes")


def adapted(variant: str = "lora", dropout: float = 0.0, method: str = "nf4", **options):
    model = lorakit.quantize(tiny_llama(hidden=64), method)
    lorakit.add_adapter(
        model, LoraConfig(r=4, alpha=8, target_modules="all-linear", variant=variant, dropout=dropout, **options)
    )
    randomize_adapters(model, 0.1)
    return model


def fused_calls(monkeypatch) -> list[int]:
    calls = []
    original = quantized_lora.QuantizedLoraFunction.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(quantized_lora.QuantizedLoraFunction, "apply", counting)
    return calls


def loss_and_grads(model, ids, fast: bool):
    for _, layer in lora_layers(model):
        layer.fast_path = fast
    model.zero_grad()
    torch.manual_seed(3)  # the same dropout masks on both paths
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize(
    "variant, dropout, options",
    [
        ("lora", 0.0, {}),
        ("lora", 0.2, {}),
        ("lora", 0.0, {"use_rslora": True}),
        ("lora-fa", 0.0, {}),
        ("dylora", 0.0, {}),
        ("adalora", 0.0, {}),
    ],
)
def test_fused_training_step_equals_the_reference_path(monkeypatch, method, variant, dropout, options):
    model = adapted(variant, dropout, method, **options)
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    calls = fused_calls(monkeypatch)
    loss, grads = loss_and_grads(model, ids, fast=True)
    assert len(calls) == 14  # every 4-bit projection of both layers took the fused function
    calls.clear()
    ref_loss, ref_grads = loss_and_grads(model, ids, fast=False)
    assert not calls
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    assert all(".lora_" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_fused_layer_is_the_float64_formula():
    model = adapted()
    layer = model.model.layers[1].mlp.down_proj  # 128 -> 64
    assert isinstance(layer, LoraQuantizedLinear)
    x = torch.randn(3, 5, 128, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "QuantizedLoraFunctionBackward"
    W = dequantized_weight(layer.base_layer).double()
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    xd = x.detach().double()
    expected = xd @ W.T + s * (xd @ A.double().T) @ B.double().T
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    gd = g.double()
    torch.testing.assert_close(x.grad.double(), gd @ W + s * (gd @ B.double()) @ A.double(), rtol=1e-5, atol=1e-5)
    close = dict(rtol=1e-4, atol=1e-5)  # fp32 sums against float64
    torch.testing.assert_close(A.grad.double(), s * (gd @ B.double()).reshape(-1, 4).T @ xd.reshape(-1, 128), **close)
    torch.testing.assert_close(B.grad.double(), s * gd.reshape(-1, 64).T @ (xd @ A.double().T).reshape(-1, 4), **close)


def test_calls_the_fused_path_does_not_cover_take_the_reference_path(monkeypatch):
    model = adapted("dora")
    calls = fused_calls(monkeypatch)
    ids = torch.randint(0, 128, (2, 9))
    model(ids)  # DoRA: its norm needs the dense weight
    assert not calls
    plain = adapted()
    plain(ids[:1, :1])  # one token: bitsandbytes' 4-bit GEMV
    assert not calls
    plain(ids)
    assert len(calls) == 14
    calls.clear()
    with lorakit.disable_adapters(plain):
        plain(ids)
    assert not calls
    int8 = adapted(method="int8")
    int8(ids)
    assert not calls


def test_fp32_adapters_on_a_half_compute_dtype_train_through_the_fused_path(monkeypatch):
    model = lorakit.quantize(tiny_llama(hidden=64), "nf4", compute_dtype="bfloat16")
    model.to(torch.bfloat16)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], adapter_dtype="float32"))
    randomize_adapters(model, 0.1)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].dtype == torch.float32
    calls = fused_calls(monkeypatch)
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 4
    assert layer.lora_A["default"].grad.dtype == torch.float32


def test_the_shared_buffer_grows_and_is_reused():
    quantized_lora.release_buffers()
    small = quantized_lora.weight_buffer(10, torch.float32, torch.device("cpu"))
    assert quantized_lora.weight_buffer(8, torch.float32, torch.device("cpu")) is small
    large = quantized_lora.weight_buffer(20, torch.float32, torch.device("cpu"))
    assert large.numel() == 20 and large is not small
    assert quantized_lora.weight_buffer(5, torch.float16, torch.device("cpu")).dtype == torch.float16
    quantized_lora.release_buffers()


def test_a_layer_repacked_by_bitsandbytes_for_its_cpu_kernel_is_put_back():
    """bitsandbytes on an AVX512-BF16 CPU rewrites the packed weight at an eval forward (into a
    layout its dequantize cannot read, with the scales rounded to bf16); lorakit switches that off
    and undoes a rewrite already done (the codes come back exactly, the scales as bf16 kept them)."""
    layer = lorakit.quantize(nn.Sequential(nn.Linear(128, 64)), "nf4")[0]
    assert not layer.support_avx512bf16_for_cpu  # lorakit's quantize switches it off
    dense = dequantized_weight(layer).clone()
    packed = layer.weight.data.clone()
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert layer.weight.quant_state.packing_format_for_cpu
    keep_standard_packing(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data.reshape(-1), packed.reshape(-1))
    torch.testing.assert_close(dequantized_weight(layer), dense, rtol=8e-3, atol=0)


def test_a_bitsandbytes_layer_wrapped_by_add_adapter_keeps_fp32_compute_in_eval():
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4").to("cpu")
    model = nn.Sequential(layer).eval()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["0"]))
    wrapped = model[0]
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = x @ dequantized_weight(wrapped.base_layer).T
        torch.testing.assert_close(wrapped.base_layer(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)  # B = 0


INTERPRETED = r"""
import torch
import bitsandbytes.functional as F
from lorakit.kernels import triton_dequant4

torch.manual_seed(0)
for quant_type in ("nf4", "fp4"):
    for nested in (True, False):
        for shape, blocksize in (((96, 256), 64), ((40, 128), 128), ((30, 64), 64), ((7, 2050), 64)):
            packed, state = F.quantize_4bit(torch.randn(*shape), blocksize=blocksize, compress_statistics=nested,
                                            quant_type=quant_type)
            want = F.dequantize_4bit(packed, state)
            inner = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if nested else None
            for dtype in (torch.float32, torch.float16):
                buffer = torch.full((shape[0] * shape[1] + 5,), float("nan"), dtype=dtype)
                got = triton_dequant4.dequantize(packed, state.code, state.absmax, state.blocksize, shape, dtype,
                                                 inner, out=buffer)
                assert got.shape == shape and got.dtype == dtype and got.data_ptr() == buffer.data_ptr()
                assert torch.equal(got, want.to(dtype)), (quant_type, nested, shape, dtype)
print("ok")
"""


def test_triton_dequantization_equals_bitsandbytes_in_the_interpreter():
    run_interpreted(INTERPRETED)


def test_cpu_weights_never_take_the_triton_kernel():
    from lorakit.kernels import triton_dequant4

    assert not triton_dequant4.available(torch.zeros(4, dtype=torch.uint8), torch.float32)


def test_bitsandbytes_notice_about_its_unused_cpu_kernel_is_dropped(caplog):
    import logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no network")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


INTERPRETED_LAYER = r"""
import torch
import lorakit
from lorakit.kernels import quantized_lora, triton_dequant4, tuning
from lorakit.state import lora_layers
from tests.tiny import randomize_adapters, tiny_llama

triton_dequant4.available = lambda packed, dtype: True  # the interpreter runs the kernel on CPU tensors
tuning.TRITON_DEQUANT = True
calls = []
kernel = triton_dequant4.dequantize
triton_dequant4.dequantize = lambda *a, **k: calls.append(1) or kernel(*a, **k)
model = lorakit.quantize(tiny_llama(hidden=64), "nf4")
lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
randomize_adapters(model, 0.1)
model.train()
ids = torch.randint(0, 128, (2, 9))
results = {}
for fast in (True, False):
    for _, layer in lora_layers(model):
        layer.fast_path = fast
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    results[fast] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
# 14 layers forward, and backward those whose input needs a gradient: all but the first layer's
# q, k, v (their input is the frozen embedding's output), so 14 + 11.
assert len(calls) == 25, len(calls)
assert len(quantized_lora._BUFFERS) == 1
torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
for name, grad in results[False][1].items():
    torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6)
print("ok")
"""


def test_the_layer_trains_through_the_triton_dequantization_in_the_interpreter():
    """``tuning.TRITON_DEQUANT``: the layer hands the kernel its packed weight, nested state and
    the shared buffer; the step equals the reference path's."""
    run_interpreted(INTERPRETED_LAYER)
