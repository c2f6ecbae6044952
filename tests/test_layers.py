"""Each LoRA layer against its formula, in float64: forward, merge/unmerge, dropout, dtypes."""

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear

from .tiny import randomize_adapters


class Net(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.lin = nn.Linear(6, 5, dtype=dtype)
        self.emb = nn.Embedding(11, 6, dtype=dtype)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1, dtype=dtype)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def adapted(targets, r=3, alpha=6, **kw):
    net = Net()
    lorakit.add_adapter(net, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=targets, **kw))
    randomize_adapters(net)
    return net


def test_linear_matches_formula():
    net = adapted(["lin"])
    layer = net.lin
    assert isinstance(layer, LoraLinear)
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = x @ layer.weight.T + layer.bias + (6 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_rslora_scaling():
    net = adapted(["lin"], r=4, alpha=8, use_rslora=True)
    assert net.lin.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_embedding_matches_formula():
    net = adapted(["emb"])
    layer = net.emb
    assert isinstance(layer, LoraEmbedding)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    onehot = nn.functional.one_hot(ids, 11).double()
    expected = layer.weight[ids] + 2.0 * (onehot @ A.T @ B.T)
    torch.testing.assert_close(layer(ids), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,shape", [("c1", (2, 3, 9)), ("c2", (2, 3, 8, 7))])
def test_conv_matches_dense_update(name, shape):
    net = adapted([name])
    layer = getattr(net, name)
    assert isinstance(layer, LoraConv)
    x = torch.randn(shape, dtype=torch.float64)
    base = layer.base_layer
    # Formula: the adapter equals a convolution with the dense kernel s * sum_j B[:, j] A[j].
    expected = base._conv_forward(x, base.weight + layer.delta_weight("default").double(), base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_gpt2_conv1d_matches_formula():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(5, 6).double()  # nf=5 outputs, nx=6 inputs; weight (6, 5)
    holder = nn.Sequential(conv)
    lorakit.add_adapter(holder, lorakit.LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    randomize_adapters(holder)
    layer = holder[0]
    assert layer.fan_in_fan_out
    x = torch.randn(3, 6, dtype=torch.float64)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias + 2.0 * (x @ A.T @ B.T))
    before = layer.weight.clone()
    lorakit.merge(holder)
    torch.testing.assert_close(layer.weight, before + 2.0 * (B @ A).T)


@pytest.mark.parametrize("targets", [["lin"], ["emb"], ["c1"], ["c2"]])
def test_merge_equals_unmerged_and_unmerge_restores(targets):
    net = adapted(targets)
    layer = getattr(net, targets[0])
    inputs = {
        "lin": torch.randn(2, 6),
        "emb": torch.tensor([[1, 2, 3]]),
        "c1": torch.randn(2, 3, 9),
        "c2": torch.randn(2, 3, 8, 7),
    }[targets[0]]
    if inputs.is_floating_point():
        inputs = inputs.double()
    weight0 = layer.weight.clone()
    out = layer(inputs)
    lorakit.merge(net)
    assert not torch.equal(layer.weight, weight0)
    torch.testing.assert_close(layer(inputs), out, rtol=1e-12, atol=1e-12)
    lorakit.unmerge(net)
    torch.testing.assert_close(layer.weight, weight0, rtol=1e-12, atol=1e-12)


def test_merge_unmerge_fp32_relative_error():
    net = nn.Sequential(nn.Linear(64, 64))
    lorakit.add_adapter(net, lorakit.LoraConfig(r=8, target_modules=["0"]))
    randomize_adapters(net, std=0.1)
    w0 = net[0].weight.detach().clone()
    lorakit.merge(net)
    lorakit.unmerge(net)
    rel = (net[0].weight - w0).norm() / w0.norm()
    assert rel < 1e-6


def test_merge_and_combine_into_base_write_the_same_rounded_sum():
    """One helper for W0 + ΔW: summed in float32, rounded once to the weight's dtype."""
    from lorakit.arithmetic.build import plus
    from lorakit.layers import LoraLayer

    net = nn.Sequential(nn.Linear(16, 16, dtype=torch.bfloat16))
    lorakit.add_adapter(net, lorakit.LoraConfig(r=4, target_modules=["0"]))
    randomize_adapters(net, std=0.1)
    layer = net[0]
    w0, delta = layer.weight.detach().clone(), layer.delta_weight("default")
    expected = (w0.float() + delta).to(torch.bfloat16)
    assert torch.equal(LoraLayer.weight_plus(w0, delta), expected)
    assert torch.equal(plus(w0, delta), expected)
    lorakit.merge(net)
    assert torch.equal(layer.weight, expected)


def test_dropout_applies_to_adapter_input_only_in_training():
    net = adapted(["lin"], dropout=0.5)
    layer = net.lin
    x = torch.randn(64, 6, dtype=torch.float64)
    net.eval()
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ A.T @ B.T))
    net.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, layer.base_layer(x) + 2.0 * (dropped @ A.T @ B.T))


@pytest.mark.parametrize(
    "base_dtype,expected",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_adapter_dtype_auto(base_dtype, expected):
    net = nn.Sequential(nn.Linear(8, 8, dtype=base_dtype))
    lorakit.add_adapter(net, lorakit.LoraConfig(r=2, target_modules=["0"]))
    assert net[0].lora_A["default"].dtype == expected
    out = net(torch.randn(2, 8, dtype=base_dtype))
    assert out.dtype == base_dtype


def test_fp16_model_gets_fp32_adapters_that_train(ids, tmp_path):
    """What dtype="auto" loads on a GPU without native bf16 (T4, V100): fp16 base, fp32 adapters
    (fp16 parameters would lose AdamW's small updates without loss scaling), also when loaded."""
    from .tiny import tiny_llama

    model = tiny_llama().half()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float16
    randomize_adapters(model)  # |A| ~ 0.5, where an fp16 step of 1e-5 would round away
    A = model.model.layers[0].self_attn.q_proj.lora_A["default"]
    before = A.detach().clone()
    optimizer = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert (A - before).abs().max() > 5e-6
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama().half()
    lorakit.load_adapter(fresh, tmp_path)
    assert all(p.dtype == torch.float32 for n, p in fresh.named_parameters() if "lora_" in n)


def test_adapter_dtype_explicit():
    net = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    lorakit.add_adapter(net, lorakit.LoraConfig(r=2, target_modules=["0"], adapter_dtype="float32"))
    assert net[0].lora_B["default"].dtype == torch.float32
    assert net(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_layer_falls_back_to_base_attributes():
    net = adapted(["lin", "emb"])
    assert net.lin.in_features == 6 and net.lin.out_features == 5
    assert net.emb.num_embeddings == 11
    assert net.lin.weight is net.lin.base_layer.weight


def test_adapters_follow_module_to():
    net = adapted(["lin"])
    net.to(torch.float32)
    assert net.lin.lora_A["default"].dtype == torch.float32
    net.to("meta")
    assert net.lin.lora_B["default"].device.type == "meta"
