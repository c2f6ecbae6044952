"""Tiny randomly initialised `transformers` models (no downloads) and test helpers."""

from __future__ import annotations

import torch


def tiny_llama(vocab: int = 128, hidden: int = 32, layers: int = 2, tie: bool = False, act: str = "silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        hidden_act=act,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(vocab: int = 128, hidden: int = 32, layers: int = 2, labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=labels,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def randomize_adapters(model, std: float = 0.5) -> None:
    """Give every adapter non-zero A and B so its update is visible (fresh B is zero)."""
    import lorakit.state

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.state.lora_layers(model):
            for params in (layer.lora_A, layer.lora_B):
                for p in params.values():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def train_steps(model, ids, steps: int, lr: float = 1e-2) -> list[float]:
    """A few plain AdamW steps of causal-LM loss on ``ids``; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def model_loss_and_grads(model, ids, fast: bool, seed: int = 0, forward=None):
    """(loss, {name: gradient}) of a causal LM on ``ids`` as its own labels, with lorakit's fast
    path on or off; the same seed each call (the same dropout masks). ``forward``: what to call
    instead of ``model`` (a compiled ``model``)."""
    import lorakit

    lorakit.set_fast_path(model, fast)
    torch.manual_seed(seed)
    loss = (model if forward is None else forward)(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def adapted_llama(use_dora: bool = False, dtype=torch.float64, act: str = "silu", **config):
    """``tiny_llama`` with a random-valued r=4 all-linear adapter (``config``: more LoraConfig
    fields), in training mode; DoRA magnitudes scaled off the norms, so ∂m and the rescale are
    not trivial."""
    import lorakit
    from lorakit.state import lora_layers

    model = tiny_llama(act=act).to(dtype)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora, **config))
    randomize_adapters(model, 0.1)
    if use_dora:
        for _, layer in lora_layers(model):
            with torch.no_grad():
                m = layer.lora_magnitude_vector["default"]
                m.mul_(torch.linspace(0.5, 1.5, m.numel(), dtype=m.dtype))
    return model.train()
