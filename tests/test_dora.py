"""DoRA against its formula (float64), its gradients, merging, and PEFT interop; LoRA-FA."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.state import lora_layers

from .tiny import randomize_adapters, tiny_llama, train_steps

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5, dtype=torch.float64)
        self.emb = nn.Embedding(11, 6, dtype=torch.float64)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)


def dora_net(target, dropout=0.0):
    net = Net()
    lorakit.add_adapter(net, LoraConfig(r=3, alpha=6, target_modules=[target], use_dora=True, dropout=dropout))
    randomize_adapters(net)
    with torch.no_grad():
        for _, layer in lora_layers(net):
            layer.lora_magnitude_vector["default"].mul_(torch.rand_like(layer.lora_magnitude_vector["default"]) + 0.5)
    return net, getattr(net, target)


def test_linear_formula_and_init():
    net = Net()
    w0 = net.lin.weight.detach().clone()
    lorakit.add_adapter(net, LoraConfig(r=3, alpha=6, target_modules=["lin"], use_dora=True))
    torch.testing.assert_close(net.lin.lora_magnitude_vector["default"], w0.norm(dim=1))  # m starts at ||W0||
    net, layer = dora_net("lin")
    A, B, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    W = layer.weight + 2.0 * B @ A
    W_dora = m[:, None] * W / W.norm(dim=1, keepdim=True)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ W_dora.T + layer.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_embedding_formula(dropout):
    net, layer = dora_net("emb", dropout=dropout)
    net.train()  # dropout has no meaning on token ids: training computes the same formula
    A, B, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    W = layer.weight + 2.0 * (B @ A).T  # (num_embeddings, dim)
    W_dora = m[None, :] * W / W.norm(dim=0, keepdim=True)
    ids = torch.tensor([[0, 4, 10]])
    out = layer(ids)
    torch.testing.assert_close(out, W_dora[ids], rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert m.grad is not None and B.grad is not None


def test_conv_formula():
    net, layer = dora_net("conv")
    W = layer.weight + layer.delta_weight("default").double()
    m = layer.lora_magnitude_vector["default"].reshape(-1, 1, 1, 1)
    W_dora = m * W / W.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, W_dora, layer.bias, padding=1), rtol=1e-10, atol=1e-10)


def test_gradients_treat_the_norm_as_constant():
    net, layer = dora_net("lin")
    A, B, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    x = torch.randn(4, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in (A, B, m)]
    A2, B2, m2 = (p.detach().clone().requires_grad_(True) for p in (A, B, m))
    W = layer.weight + 2.0 * B2 @ A2
    norm = W.norm(dim=1, keepdim=True).detach()
    (x @ (m2[:, None] * W / norm).T + layer.bias).pow(2).sum().backward()
    for g, ref in zip(got, (A2.grad, B2.grad, m2.grad)):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-10)


def test_dropout_path_matches_formula():
    net, layer = dora_net("lin", dropout=0.3)
    net.train()
    x = torch.randn(8, 6, dtype=torch.float64)
    torch.manual_seed(4)
    out = layer(x)
    torch.manual_seed(4)
    xd = nn.functional.dropout(x, 0.3, training=True)
    A, B, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    W = layer.weight + 2.0 * B @ A
    scale = m / W.norm(dim=1)
    expected = x @ layer.weight.T + layer.bias + (scale - 1) * (xd @ layer.weight.T) + scale * (2.0 * xd @ A.T @ B.T)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "target,inputs",
    [
        ("lin", lambda: torch.randn(3, 6, dtype=torch.float64)),
        ("emb", lambda: torch.tensor([[1, 2, 9]])),
        ("conv", lambda: torch.randn(2, 3, 5, 5, dtype=torch.float64)),
    ],
)
def test_merge_and_unmerge(target, inputs):
    net, layer = dora_net(target)
    x = inputs()
    w0, out = layer.weight.clone(), layer(x)
    lorakit.merge(net)
    torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-10)
    lorakit.unmerge(net)
    torch.testing.assert_close(layer.weight, w0, rtol=1e-10, atol=1e-10)


def test_adapter_batch_with_dora(ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True), name="d")
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), name="p")
    randomize_adapters(model, 0.2)
    singles = []
    for i, name in enumerate(["d", "p", "d"]):
        lorakit.set_adapter(model, name)
        singles.append(model(ids[i : i + 1]).logits)
    with lorakit.adapter_batch(model, ["d", "p", "d"]):
        mixed = model(ids).logits
    for i in range(3):
        torch.testing.assert_close(mixed[i : i + 1], singles[i], rtol=1e-5, atol=1e-5)


def test_dora_round_trips_through_peft(tmp_path, ids):
    model = tiny_llama()
    lorakit.add_adapter(
        model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)
    )
    randomize_adapters(model, 0.2)
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    peft_model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "embed_tokens"])
    ).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_dora_training_lowers_loss(ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    losses = train_steps(model, ids, 8)
    assert losses[-1] < losses[0] - 0.1


def test_lora_fa_freezes_A_and_halves_trainable(ids):
    plain, fa = tiny_llama(), tiny_llama()
    lorakit.add_adapter(plain, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    lorakit.add_adapter(fa, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_fa=True))
    assert lorakit.trainable_parameters(fa)[0] * 2 == lorakit.trainable_parameters(plain)[0]
    A0 = {n: l.lora_A["default"].clone() for n, l in lora_layers(fa)}
    losses = train_steps(fa, ids, 5)
    assert losses[-1] < losses[0]
    assert all(torch.equal(l.lora_A["default"], A0[n]) for n, l in lora_layers(fa))
    out = fa(ids).logits
    lorakit.merge(fa)
    torch.testing.assert_close(fa(ids).logits, out, rtol=1e-5, atol=1e-5)


# --- DoRA next to other adapters: each one sees W0, whatever the order -----------------------


def two_adapter_net(target, kinds):
    """Net with adapters "first" and "second" on ``target`` (kinds: "lora" / "dora"), both active."""
    net = Net()
    for name, kind in zip(("first", "second"), kinds):
        lorakit.add_adapter(net, LoraConfig(r=3, alpha=6, target_modules=[target], use_dora=kind == "dora"), name=name)
    randomize_adapters(net)
    layer = getattr(net, target)
    with torch.no_grad():
        for m in layer._modules.get("lora_magnitude_vector", {}).values():
            m.mul_(torch.rand_like(m) + 0.5)
    lorakit.set_adapter(net, ["first", "second"])
    return net, layer


def formula_weight(layer, w0):
    """W0 + sum over adapters of their change (LoRA: s B A; DoRA: m/||W0 + s B A|| (W0 + s B A) - W0),
    every change taken against W0, in float64 and laid out like the base weight."""
    unit = layer.unit_dim
    dims = [d for d in range(w0.dim()) if d != unit]
    total = w0.clone()
    for name in layer.adapter_names:
        A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
        delta = 2.0 * (B.flatten(1) @ A.flatten(1))  # s = alpha / r = 2
        delta = delta.T if unit == 1 else delta.reshape(w0.shape)  # embedding: (num_embeddings, dim)
        if layer.variants[name].name != "dora":
            total += delta
            continue
        shape = [1] * w0.dim()
        shape[unit] = -1
        m = layer.lora_magnitude_vector[name].detach().reshape(shape)
        combined = w0 + delta
        total += m * combined / torch.linalg.vector_norm(combined, dim=dims, keepdim=True) - w0
    return total


def apply_weight(target, weight, bias, x):
    if target == "lin":
        return nn.functional.linear(x, weight, bias)
    if target == "emb":
        return nn.functional.embedding(x, weight)
    return nn.functional.conv2d(x, weight, bias, padding=1)


INPUTS = {
    "lin": lambda: torch.randn(3, 6, dtype=torch.float64),
    "emb": lambda: torch.tensor([[1, 2, 9]]),
    "conv": lambda: torch.randn(2, 3, 5, 5, dtype=torch.float64),
}
KINDS = [("lora", "dora"), ("dora", "lora"), ("dora", "dora")]


@pytest.mark.parametrize("target", ["lin", "emb", "conv"])
@pytest.mark.parametrize("kinds", KINDS, ids="+".join)
def test_several_active_adapters_each_see_the_base_output(target, kinds):
    net, layer = two_adapter_net(target, kinds)
    x = INPUTS[target]()
    bias = getattr(layer.base_layer, "bias", None)
    expected = apply_weight(target, formula_weight(layer, layer.weight.detach()), bias, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    lorakit.set_adapter(net, ["second", "first"])  # the order of the active list changes nothing
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target", ["lin", "emb", "conv"])
@pytest.mark.parametrize("kinds", KINDS, ids="+".join)
def test_merging_several_adapters_matches_their_forward(target, kinds):
    net, layer = two_adapter_net(target, kinds)
    x = INPUTS[target]()
    w0, out = layer.weight.detach().clone(), layer(x)
    lorakit.merge(net)
    torch.testing.assert_close(layer.weight.detach(), formula_weight(layer, w0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), out, rtol=1e-12, atol=1e-12)
    for name in ("first", "second"):  # unmerge in either order (unload(merge=False) goes first to last)
        layer.unmerge(name)
        lorakit.merge(net, [name])
    lorakit.unmerge(net)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target", ["lin", "emb", "conv"])
@pytest.mark.parametrize("merged", ["first", "second"])
@pytest.mark.parametrize("kinds", KINDS, ids="+".join)
def test_forward_with_some_adapters_merged(target, merged, kinds):
    net, layer = two_adapter_net(target, kinds)
    x = INPUTS[target]()
    out = layer(x)
    lorakit.merge(net, [merged])  # the other adapter still runs in forward, against W0
    torch.testing.assert_close(layer(x), out, rtol=1e-12, atol=1e-12)
    # The dropout path recomputes W0 x from the dropped-out input: also from W0, not the merged
    # weight. (p = 0 takes that path and keeps the output comparable.)
    for name in layer.adapter_names:
        layer.lora_dropout[name] = nn.Dropout(0.0)
    net.train()
    torch.testing.assert_close(layer(x), out, rtol=1e-12, atol=1e-12)


# --- merge bookkeeping and the factor unmerging divides by ----------------------------------


def failing_write(monkeypatch, layer):
    def add_to_weight(delta):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(layer, "add_to_weight", add_to_weight)


def test_failed_unmerge_write_keeps_the_adapter_merged_with_its_norm(monkeypatch):
    net, layer = dora_net("lin")
    x = INPUTS["lin"]()
    w0, out = layer.weight.detach().clone(), layer(x)
    lorakit.merge(net)
    failing_write(monkeypatch, layer)
    with pytest.raises(RuntimeError, match="out of memory"):
        lorakit.unmerge(net)
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer.unmerged_weight(), w0, rtol=1e-12, atol=1e-12)  # still solved as DoRA
    torch.testing.assert_close(layer(x), out, rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    lorakit.unmerge(net)  # the retry works
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-12, atol=1e-12)


def test_failed_merge_write_leaves_the_layer_as_it_was(monkeypatch):
    net, layer = dora_net("lin")
    x = INPUTS["lin"]()
    w0, out = layer.weight.detach().clone(), layer(x)
    failing_write(monkeypatch, layer)
    with pytest.raises(RuntimeError, match="out of memory"):
        lorakit.merge(net)
    assert layer.merged_adapters == [] and layer.merge_records == {}
    monkeypatch.undo()
    assert torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), out, rtol=0, atol=0)
    lorakit.merge(net)
    lorakit.unmerge(net)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-12, atol=1e-12)


def halve_magnitudes(layer, names):
    """m = ||W0 + s B A|| / 2: each adapter's c = 1/2, so two merged put 1 + 2 (c - 1) = 0 on W0."""
    with torch.no_grad():
        for name in names:
            layer.lora_magnitude_vector[name].copy_(layer.variants[name].weight_norm(layer, name) / 2)


@pytest.mark.parametrize("target", ["lin", "emb", "conv"])
def test_merge_that_would_lose_w0_is_refused_before_writing(target):
    net, layer = two_adapter_net(target, ("dora", "dora"))
    halve_magnitudes(layer, ["first", "second"])
    x = INPUTS[target]()
    w0, out = layer.weight.detach().clone(), layer(x)
    with pytest.raises(lorakit.AdapterStateError, match=rf"module '{target}'.*'first'.*unmerge.*into_base=True"):
        lorakit.merge(net)
    assert layer.merged_adapters == [] and torch.equal(layer.weight, w0)
    lorakit.merge(net, ["first"])  # one of them alone is fine
    with pytest.raises(lorakit.AdapterStateError, match=r"'second'.*fewer of the DoRA adapters \['first', 'second'\]"):
        lorakit.merge(net, ["second"])
    assert layer.merged_adapters == ["first"]
    torch.testing.assert_close(layer(x), out, rtol=1e-12, atol=1e-12)  # finite, as before
    lorakit.unmerge(net)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-12, atol=1e-12)
    # The way to keep both for good: their effect written into the base, no division involved.
    lorakit.combine(net, ["first", "second"], into_base=True)
    torch.testing.assert_close(layer.weight.detach(), formula_weight(layer, w0), rtol=1e-10, atol=1e-10)


def test_unmerge_that_would_lose_w0_is_refused_and_unmerge_all_goes_latest_first():
    """c = 2, 1/2, 1/2 merged in this order scale W0 by 2, 3/2, 1; unmerging the first would
    leave the other two, which scale it by 0."""
    net = Net()
    for name in ("big", "first", "second"):
        lorakit.add_adapter(net, LoraConfig(r=3, alpha=6, target_modules=["lin"], use_dora=True), name=name)
    randomize_adapters(net)
    lorakit.set_adapter(net, ["big", "first", "second"])
    layer = net.lin
    halve_magnitudes(layer, ["first", "second"])
    with torch.no_grad():
        layer.lora_magnitude_vector["big"].copy_(layer.variants["big"].weight_norm(layer, "big") * 2)
    x = INPUTS["lin"]()
    w0, out = layer.weight.detach().clone(), layer(x)
    lorakit.merge(net)
    with pytest.raises(lorakit.AdapterStateError, match="unmerging DoRA adapter 'big'.*reverse order"):
        layer.unmerge("big")
    assert layer.merged_adapters == ["big", "first", "second"]
    torch.testing.assert_close(layer(x), out, rtol=1e-12, atol=1e-12)
    lorakit.unmerge(net)  # second, first, big: each state on the way was checked when merging
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-12, atol=1e-12)
    lorakit.merge(net)
    lorakit.unload(net, merge=False)  # the original base back: unmerged latest first too
    torch.testing.assert_close(net.lin.weight.detach(), w0, rtol=1e-12, atol=1e-12)


def test_zero_magnitude_unit_cannot_be_merged():
    net, layer = dora_net("lin")
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][2] = 0  # that unit's merged weight would be 0: W0 is gone
    with pytest.raises(lorakit.AdapterStateError, match="1 output unit.*keep it unmerged"):
        layer.merge("default")
    assert layer.merged_adapters == [] and torch.equal(layer.weight, w0)


def test_unload_merges_a_zero_magnitude_unit_for_good():
    """unload(merge=True) needs no W0 afterwards: the unit merges to the zero row it computes."""
    net, layer = dora_net("lin")
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][2] = 0
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        want = net.lin(x)
    assert torch.all(want[:, 2] == layer.base_layer.bias[2])  # the unit's output is its bias alone
    with pytest.raises(lorakit.AdapterStateError):
        lorakit.merge(net)  # an ordinary merge still refuses: unmerge would need W0
    lorakit.unload(net)
    with torch.no_grad():
        torch.testing.assert_close(net.lin(x), want, rtol=1e-12, atol=1e-12)
    assert torch.all(net.lin.weight[2] == 0)


def test_refusal_in_a_later_layer_writes_no_layer():
    net = Net()
    for name in ("first", "second"):
        lorakit.add_adapter(net, LoraConfig(r=3, alpha=6, target_modules=["lin", "conv"], use_dora=True), name=name)
    randomize_adapters(net)
    halve_magnitudes(net.conv, ["first", "second"])  # lin (first in the model) could merge, conv cannot
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(lorakit.AdapterStateError, match="module 'conv'"):
        lorakit.merge(net, ["first", "second"])
    assert net.lin.merged_adapters == [] and net.conv.merged_adapters == []
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
