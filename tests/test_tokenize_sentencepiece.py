"""Tokenizers that prepend a dummy space ("▁", or "Ġ" with add_prefix_space) where the usual
masking tests do not reach: the Llama tokenizer itself (legacy and not), prompts that end in a
special token, slow (pure-Python) tokenizers without offsets, and batching. Offline: every
tokenizer is built here from the small vocabulary trained in test_data."""

from __future__ import annotations

import json

import pytest

from lorakit.data import Record, demo_records, tokenize_records

from .test_data import CHATML, NO_STOP, _train_tokenizer
from .test_data_masking import STYLES

IGNORE = -100

# Mistral / DeepSeek style: the generation prompt ends in a special token ("[/INST]") and the
# answer follows it directly, with no newline or space to separate them.
INST = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
)


def _llama_tokenizer(legacy: bool):
    """`LlamaTokenizer(Fast)` over the small SentencePiece-style vocabulary; ``legacy=True`` puts
    a "▁" after every special token, as the Llama-2 / Mistral tokenizers on the Hub do."""
    from transformers import LlamaTokenizerFast

    model = json.loads(_train_tokenizer(sentencepiece_style=True).backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return LlamaTokenizerFast(
        vocab=model["vocab"],
        merges=merges,
        legacy=legacy,
        unk_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_end|>"],
    )


def _tokenizer(style: str):
    if style.startswith("llama"):
        tok = _llama_tokenizer(legacy=style == "llama-legacy")
    else:
        tok = _train_tokenizer(**STYLES[style])
    tok.add_tokens(["[INST]", "[/INST]"], special_tokens=True)
    return tok


def _answer_starts(example) -> list[int]:
    labels = example["labels"]
    return [i for i, label in enumerate(labels) if label != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]


@pytest.mark.parametrize("style", ["llama-legacy", "llama", *STYLES])
def test_answer_after_a_special_token_is_tokenized_as_in_the_whole_text(style):
    # Legacy tokenizers put "▁" after every special token, so after "[/INST]" the whole text has
    # "▁Paris": that is what the model was trained on and generates. The answer used to be learned
    # as "P", "aris" (tokenized after a plain sentinel, with no "▁").
    tok = _tokenizer(style)
    tok.chat_template = INST
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris is."},
    ]
    (example,), _ = tokenize_records([Record.from_messages(messages)], tok)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert example["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    # Each answer still follows exactly the prompt generation would be given.
    for start, turn in zip(_answer_starts(example), (1, 3), strict=True):
        prompt = tok.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        assert example["input_ids"][:start] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_legacy_llama_answer_after_special_token_keeps_its_space():
    tok = _tokenizer("llama-legacy")
    tok.chat_template = INST
    (example,), _ = tokenize_records([Record.from_prompt_completion("Capital of France?", "Paris is.")], tok)
    answer = [
        t for t, label in zip(tok.convert_ids_to_tokens(example["input_ids"]), example["labels"]) if label != IGNORE
    ]
    assert answer == ["▁P", "ar", "is", "▁is", ".", "<|im_end|>"]


# -- slow (pure-Python) tokenizers: no offset mapping -------------------------------------------------


def _slow_tokenizer(fast):
    """A slow tokenizer (`is_fast` False, no offsets) with ``fast``'s vocabulary: each piece between
    added tokens is encoded on its own, with its "▁", as the slow legacy Llama tokenizer does.
    (sentencepiece itself is not installed here.)"""
    from transformers import PreTrainedTokenizer  # the base class of slow tokenizers

    class SlowSentencePiece(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            self.pieces = fast.backend_tokenizer
            self.vocab = self.pieces.get_vocab(with_added_tokens=False)
            self.id_to_token = {i: t for t, i in self.vocab.items()}
            super().__init__(**kwargs)

        def get_vocab(self):
            return {**self.vocab, **self._added_tokens_encoder}

        @property
        def vocab_size(self):
            return len(self.vocab)

        def _tokenize(self, text, **kwargs):
            return self.pieces.encode(text, add_special_tokens=False).tokens

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, self.unk_token_id)

        def _convert_id_to_token(self, index):
            return self.id_to_token[index]

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens).replace("\u2581", " ")

    return SlowSentencePiece(
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"],
    )


SLOW_CASES = {"no-template": None, "chatml": CHATML, "no-stop": NO_STOP, "inst": INST}


def _mixed_records(with_chat: bool) -> list[Record]:
    """The masking tests' boundaries, an empty answer, a text record, a two-turn chat, demo data."""
    records = [
        Record.from_prompt_completion(p, c)
        for p, c in [
            ("Capital of Kenya? Answer: ", "Nairobi"),
            ("Capital of Kenya? Answer:", " Nairobi"),
            ("Capital? A: Pa", "ris is."),
            ('Reply: {"name', '": "Grace"}'),
            ("Empty?", ""),
        ]
    ]
    records.append(Record.from_text("The quick brown fox."))
    if with_chat:
        records.append(
            Record.from_messages(
                [
                    {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Capital?"},
                    {"role": "assistant", "content": "Paris."},
                ]
            )
        )
    return records + demo_records(20, "train", seed=5)


@pytest.mark.parametrize("template", SLOW_CASES.values(), ids=SLOW_CASES.keys())
def test_slow_tokenizer_masks_as_the_fast_one(template):
    # The slow tokenizer has no offsets; it used to fail with KeyError: 'offset_mapping'.
    fast = _tokenizer("sp-always")
    slow = _slow_tokenizer(fast)
    assert not slow.is_fast
    fast.chat_template = slow.chat_template = template
    records = _mixed_records(with_chat=template is not None)
    assert tokenize_records(records, slow) == tokenize_records(records, fast)


def test_slow_tokenizer_answer_merging_with_the_text_after_it():
    # The template puts "." right after the answer, and "▁seats." is one token. A fast tokenizer
    # gives that token to the answer (by offsets); without offsets the answer is tokenized on its
    # own and the "." follows as context.
    fast = _tokenizer("sp-always")
    slow = _slow_tokenizer(fast)
    slow.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}"
        "<|im_end|>{% else %}{{ m['content'] }}.{% endif %}{% endfor %}"
    )
    record = Record.from_messages(
        [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Two seats"}]
    )
    (example,), _ = tokenize_records([record], slow)
    tokens = slow.convert_ids_to_tokens(example["input_ids"])
    answer = [t for t, label in zip(tokens, example["labels"]) if label != IGNORE]
    assert answer == ["▁T", "w", "o", "▁seats", "<|endoftext|>"]
    assert tokens[-1] == "." and "▁seats." in fast.get_vocab()


# -- batching ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["llama-legacy", "sp-always", "byte-level-prefix-space"])
def test_batched_tokenization_equals_one_record_at_a_time(style, monkeypatch):
    import lorakit.data.continuation

    monkeypatch.setattr(lorakit.data.continuation, "_BATCH", 4, raising=False)  # batches end inside the data
    tok = _tokenizer(style)
    tok.chat_template = CHATML
    records = _mixed_records(with_chat=True)
    examples, _ = tokenize_records(records, tok)
    assert examples == [tokenize_records([r], tok)[0][0] for r in records]
