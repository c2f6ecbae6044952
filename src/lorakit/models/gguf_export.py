"""Writing a (merged) Llama-architecture model as a GGUF file for llama.cpp and Ollama.

What llama.cpp's own converter (convert_hf_to_gguf.py) writes for a Hugging Face Llama, done with
the ``gguf`` package's writer, tensor-name map and vocabulary helpers:

- tensors under llama.cpp's names (``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, ...)``), 2-D
  weights in f16 or f32, norms always in f32; a tied output head is left out (llama.cpp reuses
  ``token_embd``);
- the rows of ``attn_q`` and ``attn_k`` **permuted** as llama.cpp's converter does: Hugging Face's
  Llama rotates the two halves of each head (``rotate_half``), llama.cpp rotates adjacent pairs,
  so each head's rows go from [x0..x(d/2-1), y0..y(d/2-1)] to [x0, y0, x1, y1, ...]. transformers'
  GGUF loader undoes it (``reverse_permute``), so a round trip gives back the same weights;
- the hyper-parameters llama.cpp reads (``llama.context_length``, ``embedding_length``,
  ``block_count``, ``feed_forward_length``, head counts, key/value lengths, rope theta and
  dimensions, RMS epsilon, vocabulary size) and the tokenizer: a byte-level BPE tokenizer as
  ``tokenizer.ggml.model = "gpt2"`` with its tokens, token types, merges, special token ids and
  chat template (``gguf.SpecialVocab``).

The LoRA adapter alone is written as llama.cpp's adapter GGUF (``general.type = "adapter"``,
``adapter.type = "lora"``, tensors ``<name>.lora_a`` / ``<name>.lora_b``), which
``llama-cli --lora`` and Ollama's ``ADAPTER`` load on top of the base model's GGUF.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

GGUF_DTYPES = ("f16", "f32")

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for the byte-level pre-tokenizers it knows,
# recognised from the tokenizer's own pre-tokenizer rather than from a table of known models.
_GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def _check_llama(config) -> dict:
    """The rope settings of a plain Llama; anything else is refused before any file is written."""
    if getattr(config, "model_type", None) != "llama":
        raise ConfigError(
            f"GGUF export supports the Llama architecture (as SmolLM2); this model is "
            f"{getattr(config, 'model_type', None)!r}: export it as safetensors and convert it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"GGUF export: rope scaling {rope_type!r} is not supported (only plain RoPE)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("GGUF export: Llama models with biases are not supported")
    return {"theta": float(theta if theta is not None else 10000.0)}


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection (or of its LoRA B) from Hugging Face's rotate-half order to
    llama.cpp's interleaved pairs, head by head (``n_head``: the projection's heads)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _writer(path: Path, name: str, config, type_: str | None = None):
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    if type_:
        writer.add_type(type_)
    writer.add_name(name)
    return writer


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model_gguf(model, tokenizer, path: Path, dtype: str = "f16", name: str = "lorakit export") -> Path:
    """Write ``model`` (a transformers Llama with no LoRA layers left: merged and unloaded) and its
    ``tokenizer`` to the GGUF file ``path``."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    config = model.config
    rope = _check_llama(config)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = _head_dim(config)
    writer = _writer(path, name, config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope["theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd for a missing output head
        if key.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for the tensor {key!r}")
        weight = tensor.detach().to("cpu", torch.float32)
        if key.endswith("self_attn.q_proj.weight"):
            weight = permute_for_llama_cpp(weight, n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            weight = permute_for_llama_cpp(weight, n_kv)
        array = weight.numpy()
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    _finish(writer)
    return path


def _pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: "gpt-2" for GPT-2's byte-level split,
    "smollm" for that split after single digits (SmolLM2's own tokenizer)."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not byte_level or any(byte_level[0].get(k, v) != v for k, v in _GPT2_SPLIT.items()):
        raise ConfigError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); "
            f"this one pre-tokenizes with {pre.get('type')!r}"
        )
    others = [s for s in steps if s.get("type") != "ByteLevel"]
    if not others:
        return "gpt-2"
    if others == [{"type": "Digits", "individual_digits": True}] and steps[0]["type"] == "Digits":
        return "smollm"
    raise ConfigError(f"GGUF export: pre-tokenizer {[s.get('type') for s in steps]} has no llama.cpp name")


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's converter writes a Hugging Face BPE tokenizer: every id up to
    the model's vocabulary size (ids no token has become unused ``[PAD<id>]``), added tokens as
    control (special) or user-defined tokens, then merges, special ids and the chat template."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if backend.get("model", {}).get("type") != "BPE":
        raise ConfigError("GGUF export supports BPE tokenizers (a fast tokenizer with a tokenizer.json)")
    pre = _pre_tokenizer_name(backend)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has ids up to {max(by_id)}, the model {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
    # Whether a BOS/EOS is added, as the tokenizer does it (its config may not say): llama.cpp's
    # default for BPE vocabularies need not match.
    probe = tokenizer("a")["input_ids"]
    for kind, token_id, position in (("bos", tokenizer.bos_token_id, 0), ("eos", tokenizer.eos_token_id, -1)):
        special.add_special_token.setdefault(kind, token_id is not None and bool(probe) and probe[position] == token_id)
    special.add_to_gguf(writer, quiet=True)


def write_adapter_gguf(model, adapter: str, path: Path, name: str = "lorakit adapter") -> Path:
    """Write the LoRA adapter ``adapter`` of ``model`` as llama.cpp's LoRA-adapter GGUF: for each
    adapted linear layer, ``<gguf name>.lora_a`` (r × in) and ``.lora_b`` (out × r, rows of q/k
    permuted as the base's are), in f32: the factors adapter arithmetic works on
    (``arithmetic.updates.low_rank_update``). Each layer's scaling is folded into its B and
    ``adapter.lora.alpha`` is 0, which llama.cpp reads as scale 1 (rank and alpha patterns, rsLoRA,
    any weights are exact)."""
    import gguf

    from ..arithmetic.updates import dense_only, low_rank_update
    from ..layers.linear import LoraLinear
    from ..state import lora_layers, saved_modules

    config = model.config
    _check_llama(config)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = _writer(path, name, config, type_="adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    for path_, module in saved_modules(model):
        if adapter in module.modules_to_save:
            raise ConfigError(
                f"GGUF adapter export: the adapter trains {path_} whole (modules_to_save), which llama.cpp's "
                "LoRA adapters cannot hold; export the merged model (--format gguf) instead"
            )
    written = 0
    for path_, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        if not isinstance(layer, LoraLinear) or dense_only(layer, adapter) or getattr(layer, "fan_in_fan_out", False):
            raise ConfigError(
                f"GGUF adapter export: {path_}'s update is not a low-rank B·A on a linear layer (DoRA, "
                "embeddings, ...); export the merged model (--format gguf) instead"
            )
        update = low_rank_update(layer, adapter)  # B with the scale folded in (VeRA's vectors too)
        gguf_name = names.get_name(f"{path_}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ConfigError(f"GGUF adapter export: llama.cpp has no tensor for {path_}")
        a, b = update.A.float().cpu(), update.B.float().cpu()
        if path_.endswith("self_attn.q_proj"):
            b = permute_for_llama_cpp(b, n_head)
        elif path_.endswith("self_attn.k_proj"):
            b = permute_for_llama_cpp(b, n_kv)
        base = gguf_name.removesuffix(".weight")
        writer.add_tensor(f"{base}.weight.lora_a", np.ascontiguousarray(a.numpy()))
        writer.add_tensor(f"{base}.weight.lora_b", np.ascontiguousarray(b.numpy()))
        written += 1
    if not written:
        raise ConfigError(f"GGUF adapter export: adapter {adapter!r} adapts no layer")
    _finish(writer)
    return path
