"""Tiny randomly initialised `transformers` models (no downloads) and test helpers."""

from __future__ import annotations

import torch


def tiny_llama(vocab: int = 128, hidden: int = 32, layers: int = 2, tie: bool = False, act: str = "silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, hidden_act=act)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(vocab: int = 128, hidden: int = 32, layers: int = 2, labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=labels)
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
