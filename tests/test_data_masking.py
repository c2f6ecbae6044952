"""Loss masks where they are easy to get wrong: the prompt/answer boundary (above all with
SentencePiece-style tokenizers, which prepend "▁" to every call), packing whole examples into
blocks, the pad-token fallback, and generation prompts rendered exactly as the training prompts.
Offline: the tokenizers are trained in test_data."""

from __future__ import annotations

import pytest

from lorakit.data import Collator, Record, eval_pairs, pack_examples, tokenize_records
from lorakit.data.render import Renderer, Segment
from lorakit.generate import render_prompt

from .test_data import CHATML, NO_STOP, _supervised_runs, _train_tokenizer, chat_tok  # noqa: F401 (fixture)

IGNORE = -100


@pytest.fixture(scope="module")
def sp_tok():
    """SentencePiece style: every word token carries the space before it ("▁Nairobi")."""
    return _train_tokenizer(sentencepiece_style=True)


STYLES = {
    "byte-level": {},
    "byte-level-prefix-space": {"prefix_space": True},
    "sp-always": {"sentencepiece_style": True},
    "sp-first": {"sentencepiece_style": True, "prepend_scheme": "first"},
}


@pytest.fixture(scope="module", params=list(STYLES))
def style_tok(request):
    """Each tokenizer style: byte-level (with or without a "Ġ" prepended to every call), and
    SentencePiece with "▁" prepended always or first only."""
    return _train_tokenizer(**STYLES[request.param])


def _tokens(tok, example, supervised: bool):
    return [
        t
        for t, label in zip(tok.convert_ids_to_tokens(example["input_ids"]), example["labels"])
        if (label != IGNORE) == supervised
    ]


def _split(example) -> tuple[list[int], list[int]]:
    """(the ids before the first supervised token, the ids from there on)."""
    n = next(i for i, label in enumerate(example["labels"]) if label != IGNORE)
    return example["input_ids"][:n], example["input_ids"][n:]


def _generation_ids(tok, prompt: str) -> list[int]:
    """What generation feeds the model for ``prompt`` (see `generate_batch`)."""
    return tok(prompt, add_special_tokens=False)["input_ids"]


# -- the prompt/answer boundary ---------------------------------------------------------------------

BOUNDARIES = {
    "prompt-ends-in-space": ("Capital of Kenya? Answer: ", "Nairobi"),  # at once: ":", "▁Nairobi"
    "answer-starts-with-space": ("Capital of Kenya? Answer:", " Nairobi"),
    "mid-word": ("Capital? A: Pa", "ris is."),  # at once: "▁P", "ar", "is": "ar" straddles
    "straddling-token": ('Reply: {"name', '": "Grace"}'),  # at once: one token '▁{"name":'
}


@pytest.mark.parametrize("prompt, completion", BOUNDARIES.values(), ids=BOUNDARIES.keys())
def test_training_prompt_is_the_generation_prompt_at_any_boundary(style_tok, prompt, completion):
    tok = style_tok
    (example,), _ = tokenize_records([Record.from_prompt_completion(prompt, completion)], tok)
    context, answer = _split(example)
    # The model is trained on exactly the tokens generation will give it ...
    assert context == _generation_ids(tok, render_prompt(tok, prompt))
    assert all(label == IGNORE for label in example["labels"][: len(context)])
    assert example["labels"][len(context) :] == answer and answer[-1] == tok.eos_token_id
    # ... and learns to go on with the completion: its text, no "▁" more (decoding adds no space).
    assert tok.decode(context + answer[:-1]) == tok.decode(context) + completion


def test_prompt_ending_in_space_leaves_the_answer_without_one(sp_tok):
    # Llama-2 style: "[INST] q [/INST] " + "answer". Generation sees the prompt's space as a
    # last "▁" token, so the answer must be learned as "N", "airobi", not "▁Nairobi".
    (example,), stats = tokenize_records(
        [Record.from_prompt_completion("Capital of Kenya? Answer: ", "Nairobi")], sp_tok
    )
    assert _tokens(sp_tok, example, supervised=False)[-2:] == [":", "▁"]
    assert _tokens(sp_tok, example, supervised=True) == ["N", "airobi", "<|endoftext|>"]
    assert stats.supervised_tokens == 3
    (example,), _ = tokenize_records(
        [Record.from_prompt_completion("Capital of France? Answer: ", "Paris is.")], sp_tok
    )
    assert sp_tok.decode(_supervised_runs(example)[0]) == "Paris is.<|endoftext|>"
    context = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE]
    assert sp_tok.decode(context) == "Capital of France? Answer: "  # and nothing of the answer


@pytest.mark.parametrize("prepend_scheme", ["always", "first"])
def test_generation_prompt_ending_in_space_chat_template(prepend_scheme):
    tok = _train_tokenizer(sentencepiece_style=True, prepend_scheme=prepend_scheme)
    tok.chat_template = NO_STOP  # the generation prompt ends in "assistant: "
    record = Record.from_messages(
        [{"role": "user", "content": "Capital of Kenya?"}, {"role": "assistant", "content": "Nairobi"}]
    )
    (example,), _ = tokenize_records([record], tok)
    assert _split(example)[0] == _generation_ids(tok, eval_pairs([record], tok)[0].prompt)
    # EOS follows the answer, before the template's trailing "\n\n" (which stays context).
    assert _tokens(tok, example, supervised=True) == ["N", "airobi", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(example["input_ids"])[-4:] == ["N", "airobi", "<|endoftext|>", "\n\n"]


@pytest.mark.parametrize("prepend_scheme", ["always", "first"])
def test_multi_turn_chat_answers_follow_their_generation_prompts(prepend_scheme):
    tok = _train_tokenizer(sentencepiece_style=True, prepend_scheme=prepend_scheme)
    tok.chat_template = CHATML  # "always" also puts a "▁" after each special token
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    (example,), _ = tokenize_records([Record.from_messages(messages)], tok)
    assert [tok.decode(run) for run in _supervised_runs(example)] == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    starts = [
        i
        for i, label in enumerate(example["labels"])
        if label != IGNORE and (i == 0 or example["labels"][i - 1] == IGNORE)
    ]
    for start, turn in zip(starts, (1, 3)):
        prompt = tok.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        assert example["input_ids"][:start] == _generation_ids(tok, prompt)
    assert tok.convert_ids_to_tokens(example["input_ids"]) == tok.convert_ids_to_tokens(
        _generation_ids(tok, tok.apply_chat_template(messages, tokenize=False))
    )


def test_token_straddling_the_boundary_is_split_there(sp_tok):
    # Tokenized at once, "...A: Pa" + "ris is." is "▁P", "ar", "is", ...: "ar" straddles the
    # boundary. Generation sees "▁P", "a", so the answer is learned from "r" on.
    (example,), _ = tokenize_records([Record.from_prompt_completion("Capital? A: Pa", "ris is.")], sp_tok)
    tokens = sp_tok.convert_ids_to_tokens(example["input_ids"])
    assert tokens[tokens.index("▁P") :] == ["▁P", "a", "r", "is", "▁is", ".", "<|endoftext|>"]
    assert _tokens(sp_tok, example, supervised=True) == ["r", "is", "▁is", ".", "<|endoftext|>"]


def test_empty_completion_trains_eos(style_tok):
    # The byte-level path always trained the EOS here; the SentencePiece one used to lose it.
    prompt = "Capital of Kenya? Answer:"
    (example,), stats = tokenize_records([Record.from_prompt_completion(prompt, "")], style_tok)
    assert _split(example) == (_generation_ids(style_tok, render_prompt(style_tok, prompt)), [style_tok.eos_token_id])
    assert stats.supervised_tokens == 1


def test_continuation_tries_another_sentinel_when_one_merges(sp_tok):
    from lorakit.data.continuation import _continuation

    # '0"}' and "\n\n" are tokens of this vocabulary: the sentinels "0" and "\n" each merge with one.
    for text, expected in [('"}', ['"}']), ("\n\nMessage:", ["\n\nMessage", ":"]), ("ris", ["r", "is"])]:
        ids, offsets = _continuation(sp_tok, text)
        assert sp_tok.convert_ids_to_tokens(ids) == expected
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)  # offsets into the text itself


def test_token_segment_rules():
    from lorakit.data.continuation import _token_segment

    prompt, answer, tail = Segment("A: ", False), Segment("yes", True, append_eos=True), Segment("\n\n", False)
    text = "A: yes\n\n"
    spans = [(0, 3, prompt), (3, 6, answer), (6, 8, tail)]
    assert _token_segment(text, 0, 2, spans) is prompt
    assert _token_segment(text, 2, 6, spans) is answer  # "▁yes": its space ends the prompt
    assert _token_segment(text, 2, 3, spans) is prompt  # a lone "▁" stays where it starts
    assert _token_segment(text, 1, 5, spans) is answer  # ": ye" straddles prompt -> answer
    assert _token_segment(text, 5, 7, spans) is answer  # "s\n" straddles answer -> tail: learned
    assert _token_segment(text, 6, 8, spans) is tail
    assert _token_segment(text, 3, 3, spans) is answer  # empty span (added tokens): its position
    assert _token_segment(text, 8, 8, spans) is None  # past the end: the caller picks the last segment


# -- packing whole examples -------------------------------------------------------------------------


def _example(first: int, n: int, n_prompt: int) -> dict[str, list[int]]:
    ids = list(range(first, first + n))
    return {"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]}


def test_pack_examples_is_greedy_over_whole_examples():
    a, b, c, d, e = (_example(10, 2, 1), _example(20, 3, 1), _example(30, 3, 2), _example(40, 2, 0), _example(50, 7, 1))
    blocks = pack_examples([a, b, c, d, e], block_size=5)
    assert [blk["input_ids"] for blk in blocks] == [[10, 11, 20, 21, 22], [30, 31, 32, 40, 41], [50, 51, 52, 53, 54]]
    assert blocks[0]["labels"] == [IGNORE, 11, IGNORE, 21, 22]  # each label stays on its token
    assert blocks[2]["labels"] == [IGNORE, 51, 52, 53, 54]  # too long: truncated from the right, alone
    # An example with nothing to learn (all prompt) is left out rather than packed.
    assert pack_examples([_example(1, 3, 3), a], block_size=5) == [a]


def test_packing_keeps_examples_whole_and_trains_every_answer_token(chat_tok):  # noqa: F811 (fixture)
    records = [
        Record.from_prompt_completion(f"Question {i}?" + " Hello there." * (i % 4), f"Answer number {i}.")
        for i in range(12)
    ]
    plain, _ = tokenize_records(records, chat_tok, max_length=100)
    packed, stats = tokenize_records(records, chat_tok, max_length=100, packing=True)
    assert stats.packed and stats.n_examples == len(packed) < len(plain)
    # Each block is consecutive whole examples, as many as fit: the next one would not.
    queue = list(plain)
    for block in packed:
        assert len(block["input_ids"]) <= 100
        taken = []
        while queue and len(taken) + len(queue[0]["input_ids"]) <= 100:
            example = queue.pop(0)
            taken += [(t, label) for t, label in zip(example["input_ids"], example["labels"])]
        assert list(zip(block["input_ids"], block["labels"])) == taken
    assert not queue
    # No block starts mid-answer, so every supervised token is predicted from its own prompt.
    trained = sum(label != IGNORE for block in packed for label in block["labels"][1:])
    assert trained == stats.supervised_tokens
    # Padding to a batch adds only ignored positions.
    batch = Collator(chat_tok)(packed[:3])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


# -- the pad-token fallback ---------------------------------------------------------------------------


def test_pad_token_falls_back_to_eos():
    from lorakit.models.tokenizer import pad_or_eos_id

    tok = _train_tokenizer()
    assert pad_or_eos_id(tok) == tok.pad_token_id != tok.eos_token_id
    tok.pad_token = None
    assert pad_or_eos_id(tok) == tok.eos_token_id and tok.pad_token is None  # only reads
    assert Collator(tok).pad_token_id == tok.eos_token_id and tok.pad_token is None
    assert pad_or_eos_id(tok, assign=True) == tok.eos_token_id and tok.pad_token == "<|endoftext|>"
    tok.pad_token = tok.eos_token = None
    assert pad_or_eos_id(tok) is None and Collator(tok).pad_token_id == 0


def test_gguf_conversion_records_the_missing_pad_token(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models.gguf import convert_gguf

    from .tiny import tiny_llama

    tok = _train_tokenizer()
    tok.pad_token = None
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama(vocab=len(tok)))
    facts = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert facts["had_pad_token"] is False and tok.pad_token == tok.eos_token


# -- generation prompts are training prompts --------------------------------------------------------


def _bos_tokenizer(**style):
    """A tokenizer that adds BOS by default, as Llama's do."""
    from tokenizers.processors import TemplateProcessing

    tok = _train_tokenizer(**style)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


@pytest.mark.parametrize(
    "user_text, completion",
    [("What is the capital of France?\nAnswer:", " Paris."), ("What is the capital of France?\nAnswer: ", "Paris.")],
    ids=["answer-with-space", "prompt-with-space"],
)
@pytest.mark.parametrize("template", [CHATML, None], ids=["chat-template", "no-template"])
@pytest.mark.parametrize("style", list(STYLES))
def test_generation_prompt_is_the_training_prompt(template, style, user_text, completion):
    tok = _bos_tokenizer(**STYLES[style])
    tok.chat_template = template
    prompt = render_prompt(tok, user_text)
    assert prompt == Renderer(tok).segments(Record.from_prompt_completion(user_text, completion))[0].text
    assert prompt.startswith("<s>") == (template is None)  # the template decides about BOS itself
    # What generation feeds the model (add_special_tokens=False) is what training saw before the answer.
    (example,), _ = tokenize_records([Record.from_prompt_completion(user_text, completion)], tok)
    assert _generation_ids(tok, prompt) == _split(example)[0]


@pytest.mark.parametrize("template", [CHATML, None], ids=["chat-template", "no-template"])
def test_chat_command_prompt_is_the_conversation_or_the_last_turn(template):
    """`lorakit chat` renders the history with the template, or without one the last user turn
    as a single prompt (it used to call apply_chat_template, which fails without a template)."""
    tok = _bos_tokenizer()
    tok.chat_template = template
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    got = Renderer(tok).conversation_prompt(history)
    if template is None:
        assert got == render_prompt(tok, "Capital of France?") == "<s>Capital of France?"
    else:
        assert got == tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert "Hello." in got and got.endswith("<|im_start|>assistant\n")
