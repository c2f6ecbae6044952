"""PEFT's AdaLoRA adapters (trained with its rank allocator, some modules pruned to rank 0) load
as the LoRA adapters they compute: the same logits as PEFT's own model."""

import json

import pytest
import torch

import lorakit

from .tiny import tiny_llama

peft = pytest.importorskip("peft")


def peft_adalora_folder(tmp_path, use_rslora=False):
    """A PEFT AdaLoRA adapter after a few steps of its budget allocator; (folder, PEFT model)."""
    torch.manual_seed(0)
    config = peft.AdaLoraConfig(
        init_r=6,
        target_r=3,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "up_proj"],
        total_step=10,
        tinit=1,
        tfinal=2,
        deltaT=1,
        use_rslora=use_rslora,
    )
    model = peft.get_peft_model(tiny_llama(), config)
    model.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path / "adalora"
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adalora_adapter_loads_with_peft_outputs(tmp_path, use_rslora):
    folder, peft_model = peft_adalora_folder(tmp_path, use_rslora)
    ranks = {k: sum(v) for k, v in json.loads((folder / "adapter_config.json").read_text())["rank_pattern"].items()}
    assert 0 in ranks.values() and any(0 < r for r in ranks.values())  # pruned and kept modules both
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    model = tiny_llama()
    name = lorakit.load_adapter(model, folder)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    adapted = {path for path, layer in lorakit.state.lora_layers(model) if name in layer.lora_A}
    kept = {key.rsplit(".lora_E", 1)[0] for key, rank in ranks.items() if rank > 0}
    assert adapted == kept  # modules pruned to rank 0 carry no adapter
    with torch.no_grad():
        base = tiny_llama()(ids).logits
    assert (got - base).abs().max() > 1e-3  # the trained update shows (not a zero adapter)
    lorakit.unload(model)  # merges into the base: the same outputs without adapter layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_an_adalora_adapter_pruned_everywhere_is_refused(tmp_path):
    folder, _ = peft_adalora_folder(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    emptied = {k: (v[:0] if k.endswith(("lora_A", "lora_E")) else v[:, :0]) for k, v in weights.items()}
    save_file(emptied, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterFileError, match="pruned to rank 0"):
        lorakit.load_adapter(tiny_llama(), folder)
