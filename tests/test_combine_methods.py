"""Each combination method against a float64 reference computed here from its formula on the dense
updates ΔW_i = s_i B_i A_i (written independently of lorakit.arithmetic)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig

TARGETS = ["lin", "emb", "conv"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(7, 5, dtype=torch.float64)
        self.emb = nn.Embedding(6, 4, dtype=torch.float64)
        self.conv = nn.Conv2d(3, 4, 2, dtype=torch.float64)


def net_with_sources():
    """Three adapters of mixed ranks: plain, rsLoRA with alpha/rank patterns, and a partial one."""
    net = Net()
    lorakit.add_adapter(net, LoraConfig(r=3, alpha=6, target_modules=TARGETS), "a")
    lorakit.add_adapter(
        net,
        LoraConfig(
            r=2, alpha=5, use_rslora=True, target_modules=TARGETS, rank_pattern={"conv": 1}, alpha_pattern={"lin": 3}
        ),
        "b",
    )
    lorakit.add_adapter(net, LoraConfig(r=4, alpha=2, target_modules=["lin"]), "c")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (net.lin, net.emb, net.conv):
            for params in (module.lora_A, module.lora_B):
                for p in params.values():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def reference_delta(net, module_name, adapter):
    """s B A laid out like the base weight, from the config's formula (zero if not adapted)."""
    layer = getattr(net, module_name)
    if adapter not in layer.lora_A:
        return np.zeros(tuple(layer.weight.shape))
    config = lorakit.state.adapter_configs(net)[adapter]
    r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
    s = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    A = layer.lora_A[adapter].detach().numpy()
    B = layer.lora_B[adapter].detach().numpy()
    update = s * B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
    if module_name == "emb":
        return update.T
    return update.reshape(tuple(layer.weight.shape))


def trim(x, density):
    k = int(density * x.size)
    keep = np.zeros(x.size, dtype=bool)
    keep[np.argsort(-np.abs(x).ravel(), kind="stable")[:k]] = True
    return np.where(keep.reshape(x.shape), x, 0.0)


def ref_ties(deltas, weights, density, normalize=True, lam=1.0, consensus="sum"):
    """TIES: trim each, elect the sign (of the weighted sum, or of the sign count), disjoint mean."""
    trimmed = [w * trim(d, density) for d, w in zip(deltas, weights)]
    if consensus == "sum":
        elected = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    else:
        elected = np.where(sum(np.sign(t) for t in trimmed) >= 0, 1.0, -1.0)
    out = np.zeros_like(deltas[0])
    divisor = np.zeros_like(deltas[0])
    for t, w in zip(trimmed, weights):
        agree = np.sign(t) == elected
        out += np.where(agree, t, 0.0)
        divisor += np.where(agree, w, 0.0)
    divisor[divisor == 0] = 1
    return lam * (out / divisor if normalize else out)


def slerp_ref(t, a, b):
    cos = float((a / np.linalg.norm(a) * b / np.linalg.norm(b)).sum())
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def full_rank_options(method):
    return {} if method in ("linear", "cat") else {"rank": 12}  # 12 >= every layer's min(d_out, d_in)


def check(net, name, expected_per_module, atol=1e-10):
    for module_name, expected in expected_per_module.items():
        got = reference_delta(net, module_name, name)
        np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-9, err_msg=f"{name} on {module_name}")


@pytest.mark.parametrize("method", ["linear", "cat", "task_arithmetic"])
def test_linear_is_exact_with_negative_weights_mixed_ranks_rslora_and_patterns(method):
    net = net_with_sources()
    weights = [0.7, -1.3, 0.4]
    report = lorakit.combine(net, ["a", "b", "c"], weights, method, "mix")
    expected = {m: sum(w * reference_delta(net, m, s) for s, w in zip("abc", weights)) for m in TARGETS}
    check(net, "mix", expected)
    assert report.exact and report.max_error == 0
    assert report.ranks == {"lin": 3 + 2 + 4, "emb": 3 + 2, "conv": 3 + 1}  # ranks concatenate
    assert lorakit.state.adapter_configs(net)["mix"].rank_pattern  # per-module ranks for the file


def test_linear_normalize_and_lambda():
    net = net_with_sources()
    lorakit.combine(net, ["a", "b"], [3.0, 1.0], "linear", "mix", normalize=True, **{"lambda": 0.5})
    check(net, "mix", {m: 0.5 * (3 * reference_delta(net, m, "a") + reference_delta(net, m, "b")) / 4 for m in TARGETS})


def test_svd_truncates_to_rank_and_reports_the_error():
    net = net_with_sources()
    report = lorakit.combine(net, ["a", "b", "c"], [1.0, 0.5, -0.5], "svd", "mix", rank=2)
    for layer_report in report.layers:
        m = layer_report.path
        total = sum(w * reference_delta(net, m, s) for s, w in zip("abc", [1.0, 0.5, -0.5]))
        flat = total.reshape(total.shape[0], -1) if m != "emb" else total.T
        U, S, Vh = np.linalg.svd(flat, full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        stored = reference_delta(net, m, "mix")
        stored = stored.reshape(stored.shape[0], -1) if m != "emb" else stored.T
        np.testing.assert_allclose(stored, best, atol=1e-10)
        assert layer_report.rank == 2
        assert layer_report.rel_error == pytest.approx(np.linalg.norm(flat - best) / np.linalg.norm(flat), rel=1e-9)
    assert not report.exact and report.total_error > 0


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_matches_the_reference(consensus):
    net = net_with_sources()
    weights = [1.0, -0.6, 0.8]
    report = lorakit.combine(net, ["a", "b", "c"], weights, "ties", "mix", density=0.5, consensus=consensus, rank=12)
    deltas = {m: [reference_delta(net, m, s) for s in "abc"] for m in TARGETS}
    check(net, "mix", {m: ref_ties(deltas[m], weights, 0.5, consensus=consensus) for m in TARGETS})
    assert report.max_error < 1e-12  # full rank: the SVD re-factorisation drops nothing


def test_sum_and_count_consensus_differ():
    net = net_with_sources()
    lorakit.combine(net, ["a", "b", "c"], [1.0, 1.0, 1.0], "ties", "by_sum", consensus="total", rank=12)
    lorakit.combine(net, ["a", "b", "c"], [1.0, 1.0, 1.0], "ties", "by_count", consensus="frequency", rank=12)
    assert not np.allclose(reference_delta(net, "lin", "by_sum"), reference_delta(net, "lin", "by_count"))


def test_magnitude_prune_and_ties_options():
    net = net_with_sources()
    lorakit.combine(net, ["a", "b"], [0.5, 2.0], "magnitude_prune", "mp", density=[0.4, 0.7], rank=12)
    check(
        net,
        "mp",
        {
            m: 0.5 * trim(reference_delta(net, m, "a"), 0.4) + 2.0 * trim(reference_delta(net, m, "b"), 0.7)
            for m in TARGETS
        },
    )
    lorakit.combine(net, ["a", "b"], [0.5, 2.0], "ties", "t", density=0.6, normalize=False, **{"lambda": 1.5}, rank=12)
    check(
        net,
        "t",
        {
            m: ref_ties([reference_delta(net, m, s) for s in "ab"], [0.5, 2.0], 0.6, normalize=False, lam=1.5)
            for m in TARGETS
        },
    )


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded(method):
    def run(seed):
        net = net_with_sources()
        lorakit.combine(net, ["a", "b"], [1.0, 0.5], method, "d", density=0.5, seed=seed, rank=12)
        return {m: reference_delta(net, m, "d") for m in TARGETS}

    first, again, other = run(1), run(1), run(2)
    for m in TARGETS:
        np.testing.assert_array_equal(first[m], again[m])
    assert any(not np.allclose(first[m], other[m]) for m in TARGETS)


@pytest.mark.parametrize("rescale", ["density", "l1", False])
def test_dare_drop_and_rescale_formula(rescale):
    """One source, so the kept entries show the mask: each kept entry is ΔW times the rescale factor."""
    net = net_with_sources()
    lorakit.combine(net, ["a"], [1.0], "dare_linear", "d", density=0.5, seed=0, rescale=rescale, rank=12)
    for m in TARGETS:
        delta, got = reference_delta(net, m, "a"), reference_delta(net, m, "d")
        kept = np.abs(got) > 1e-9
        assert 0 < kept.sum() < kept.size
        factor = {"density": 1 / 0.5, False: 1.0, "l1": np.abs(delta).sum() / np.abs(delta[kept]).sum()}[rescale]
        np.testing.assert_allclose(got[kept], factor * delta[kept], rtol=1e-9)
        np.testing.assert_allclose(got[~kept], 0, atol=1e-9)


def test_dare_with_density_one_is_linear():
    net = net_with_sources()
    lorakit.combine(net, ["a", "b"], [1.0, -2.0], "dare_linear", "d", density=1.0, rank=12)
    check(net, "d", {m: reference_delta(net, m, "a") - 2 * reference_delta(net, m, "b") for m in TARGETS})


def test_slerp_matches_formula_and_falls_back_to_lerp_when_parallel():
    net = net_with_sources()
    lorakit.combine(net, ["a", "b"], method="slerp", name="s", t=0.3, rank=12)
    check(net, "s", {m: slerp_ref(0.3, reference_delta(net, m, "a"), reference_delta(net, m, "b")) for m in TARGETS})
    # a2 = 2·a (same direction): sin θ = 0, so slerp must be the linear interpolation.
    net2 = net_with_sources()
    lorakit.add_adapter(net2, LoraConfig(r=3, alpha=12, target_modules=TARGETS), "a2")  # s doubles
    with torch.no_grad():
        for module in (net2.lin, net2.emb, net2.conv):
            module.lora_A["a2"].copy_(module.lora_A["a"])
            module.lora_B["a2"].copy_(module.lora_B["a"])
    lorakit.combine(net2, ["a", "a2"], method="slerp", name="s", t=0.25, rank=12)
    check(
        net2, "s", {m: 0.75 * reference_delta(net2, m, "a") + 0.25 * 2 * reference_delta(net2, m, "a") for m in TARGETS}
    )


def test_into_base_adds_the_exact_result_to_the_weights():
    net = net_with_sources()
    before = {m: getattr(net, m).weight.detach().clone().numpy() for m in TARGETS}
    deltas = {m: [reference_delta(net, m, s) for s in "ab"] for m in TARGETS}
    report = lorakit.combine(net, ["a", "b"], [1.0, 0.5], "ties", density=0.5, into_base=True)
    assert report.into_base and report.name is None and "mix" not in lorakit.adapters(net)
    for m in TARGETS:
        np.testing.assert_allclose(
            getattr(net, m).weight.detach().numpy() - before[m], ref_ties(deltas[m], [1.0, 0.5], 0.5), atol=1e-12
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sources=["a", "zz"]), "unknown adapter 'zz'"),
        (dict(weights=[1.0]), "one number per source"),
        (dict(method="average"), "unknown combination method"),
        (dict(method="ties", density=0.0), "density must be in (0, 1]"),
        (dict(method="ties", density=1.5), "density must be in (0, 1]"),
        (dict(method="linear", density=0.5), "does not take ['density']"),
        (dict(method="slerp", weights=None, sources=["a", "b", "c"]), "exactly two"),
        (dict(method="slerp", t=1.5, sources=["a", "b"], weights=None), "t must be in [0, 1]"),
        (dict(method="ties", consensus="mean"), "consensus must be"),
        (dict(method="dare_ties", rescale="l3"), "rescale must be"),
        (dict(method="svd", rank=0), "rank must be a positive integer"),
        (dict(name="a"), "already exists"),
        (dict(sources=["a", "a"], weights=[1.0, 1.0]), "more than once"),
    ],
)
def test_bad_requests_raise_before_touching_the_model(kwargs, message):
    net = net_with_sources()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    call = dict(sources=["a", "b"], weights=[1.0, 1.0], method="linear", name="new") | kwargs
    with pytest.raises(lorakit.LorakitError) as info:
        lorakit.combine(net, call.pop("sources"), call.pop("weights"), call.pop("method"), call.pop("name"), **call)
    assert message in str(info.value)
    assert lorakit.adapters(net) == ["a", "b", "c"]
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_options_error_is_a_config_error():
    net = net_with_sources()
    with pytest.raises(ConfigError):
        lorakit.combine(net, ["a", "b"], [1.0, 1.0], "ties", "x", density=-1)
