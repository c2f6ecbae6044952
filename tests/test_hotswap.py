"""`hotswap_adapter`: exact results, checks before writes, and no recompilation under torch.compile."""

import pytest
import torch

import lorakit
from lorakit import AdapterStateError, LoraConfig

from .tiny import randomize_adapters, tiny_llama

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def adapter_dir(tmp_path, name, seed, **config):
    """Save a randomised adapter trained on nothing: a known update to swap in."""
    model = tiny_llama().double()
    lorakit.add_adapter(model, LoraConfig(**{"r": 4, "alpha": 8, "target_modules": "all-linear", **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    lorakit.save_adapter(model, tmp_path / name)
    return tmp_path / name


def expected_logits(path):
    model = tiny_llama().double()
    lorakit.load_adapter(model, path)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "config",
    [{"r": 4}, {"r": 2, "alpha": 3}, {"r": 3, "use_rslora": True}, {"r": 2, "target_modules": ["q_proj", "v_proj"]}],
    ids=["same-rank", "smaller-rank", "rslora", "fewer-modules"],
)
def test_swapped_in_adapter_gives_its_own_outputs(tmp_path, config):
    slot = tiny_llama().double()
    lorakit.add_adapter(slot, LoraConfig(r=4, alpha=16, target_modules="all-linear"))
    randomize_adapters(slot)
    new = adapter_dir(tmp_path, "new", 1, **config)
    lorakit.hotswap_adapter(slot, new)
    with torch.no_grad():
        torch.testing.assert_close(slot(IDS).logits, expected_logits(new), rtol=1e-10, atol=1e-10)
    assert slot.model.layers[0].self_attn.q_proj.lora_A["default"].shape == (4, 32)  # the slot's tensors stay


def test_swap_from_a_loaded_adapter_and_dora(tmp_path):
    slot = tiny_llama().double()
    lorakit.add_adapter(slot, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    dora = adapter_dir(tmp_path, "dora", 2, r=2, use_dora=True)
    lorakit.load_adapter(slot, dora, name="other", activate=False)
    lorakit.hotswap_adapter(slot, "other")
    with torch.no_grad():
        torch.testing.assert_close(slot(IDS).logits, expected_logits(dora), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["larger-rank", "extra-modules", "lora-into-dora", "not-a-directory", "merged"])
def test_refusals_leave_the_slot_untouched(tmp_path, case):
    slot = tiny_llama().double()
    targets = ["q_proj", "v_proj"] if case == "extra-modules" else "all-linear"
    lorakit.add_adapter(slot, LoraConfig(r=4, target_modules=targets, use_dora=case == "lora-into-dora"))
    randomize_adapters(slot)
    source = {
        "larger-rank": lambda: adapter_dir(tmp_path, "big", 3, r=8),
        "extra-modules": lambda: adapter_dir(tmp_path, "all", 3, r=2),
        "lora-into-dora": lambda: adapter_dir(tmp_path, "plain", 3, r=2),
        "not-a-directory": lambda: tmp_path / "missing",
        "merged": lambda: adapter_dir(tmp_path, "any", 3, r=2),
    }[case]()
    if case == "merged":
        lorakit.merge(slot)
    before = {k: v.clone() for k, v in slot.state_dict().items()}
    with pytest.raises(lorakit.LorakitError) as info:
        lorakit.hotswap_adapter(slot, source)
    assert len(str(info.value)) > 30
    for key, value in slot.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_no_recompilation_when_swapping(tmp_path, use_dora):
    """A compiled model keeps its graph across swaps of same or smaller rank (fast path on)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    slot = tiny_llama()
    lorakit.add_adapter(slot, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
    counter = CompileCounter()
    compiled = torch.compile(slot, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(IDS)
        frames = counter.frame_count
        assert frames >= 1
        for name, config in (("a", {"r": 4}), ("b", {"r": 2, "alpha": 5})):
            path = adapter_dir(tmp_path, name, 5, use_dora=use_dora, **config)
            lorakit.hotswap_adapter(slot, path)
            got = compiled(IDS).logits
            torch.testing.assert_close(got.double(), expected_logits(path), rtol=1e-4, atol=1e-4)
    assert counter.frame_count == frames  # no new graph
    # A larger rank than the slot's would change the tensors' shapes (and the graph): refused.
    with pytest.raises(AdapterStateError):
        lorakit.hotswap_adapter(slot, adapter_dir(tmp_path, "c", 6, r=8))
