"""lorakit.data: reading, validation errors, loss masks, truncation, splits, batching, evaluation
prompts, the demo dataset and exact match. Offline: the tokenizers are trained here. Packing and
the masks' edge cases are in test_data_masking."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lorakit.data import (
    Collator,
    Record,
    demo_records,
    eval_pairs,
    exact_match,
    pack_examples,
    read_records,
    split_records,
    tokenize_records,
    write_demo_dataset,
)
from lorakit.data.demo_task import KEYS
from lorakit.errors import DataError, LorakitError

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like SmolLM2's: a default system prompt, inserted only when the conversation has none.
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# No end-of-turn token at all: the final answer must get an explicit EOS.
NO_STOP = (
    "{% for message in messages %}### {{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant: {% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [r.prompt + " " + r.completion for r in demo_records(150, "train", seed=3)] + [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris. Hello there!",
]


def _train_tokenizer(sentencepiece_style: bool = False, prepend_scheme: str = "always", prefix_space: bool = False):
    """A small BPE tokenizer: byte-level (GPT-2 style; ``prefix_space``: with a "Ġ" prepended to
    every call, as RoBERTa-style tokenizers do), or SentencePiece style, which prepends "▁" to every
    call as Llama-2/Mistral tokenizers do; ``prepend_scheme="always"`` also after each special
    token (legacy Llama), ``"first"`` only at the start of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if sentencepiece_style:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
        alphabet = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


@pytest.fixture(scope="module")
def plain_tok():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tok = _train_tokenizer()
    tok.chat_template = CHATML
    return tok


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _supervised_runs(example):
    """Decoded text of each maximal run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# -- reading -------------------------------------------------------------------------------------


def test_reads_each_jsonl_shape(tmp_path):
    pc = read_records(
        _write(
            tmp_path,
            "pc.jsonl",
            [{"prompt": "2+2?", "completion": "4", "id": 7}, "", {"prompt": "Hi", "completion": "Hello"}],
        )
    )
    assert [(r.kind, r.prompt, r.completion) for r in pc] == [
        ("prompt_completion", "2+2?", "4"),
        ("prompt_completion", "Hi", "Hello"),
    ]
    assert pc[1].source.endswith("pc.jsonl:line 3")  # the blank line still counts
    chat = read_records(
        _write(
            tmp_path,
            "chat.jsonl",
            [
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                    ]
                }
            ],
        )
    )
    assert chat[0].kind == "chat" and [m["role"] for m in chat[0].messages] == ["system", "user", "assistant"]
    text = read_records(_write(tmp_path, "text.jsonl", [{"text": "Some document."}]))
    assert text == [Record.from_text("Some document.")]


def test_reads_csv_and_json_array(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,completion\n"Say hi,\nplease",hi\nq2,a2\n')
    records = read_records(csv_path)
    assert [(r.prompt, r.completion) for r in records] == [("Say hi,\nplease", "hi"), ("q2", "a2")]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r.text for r in read_records(json_path)] == ["a", "b"]


def test_csv_problems_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nq1,a1\nq2,\n")
    with pytest.raises(DataError, match=r"d\.csv:line 3: 'completion' is empty"):
        read_records(path)
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError, match="header has columns"):
        read_records(path)


@pytest.mark.parametrize(
    "bad, expected",
    [
        ('{"prompt": "a", "completion": }', "invalid JSON"),
        ({"prompt": "a"}, "missing key 'completion'"),
        ({"prompt": "a", "completion": 3}, "'completion' must be a string, got a number"),
        ({"prompt": "a", "completion": "   "}, "'completion' is empty"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "content is empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no 'assistant' turn"),
        ({"text": "just text"}, "mixed shapes"),
        ({"question": "q"}, "no recognised keys"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, bad, expected):
    good = (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        if isinstance(bad, dict) and "messages" in bad
        else {"prompt": "ok", "completion": "fine"}
    )
    path = _write(tmp_path, "bad.jsonl", [good, bad])
    with pytest.raises(DataError) as info:
        read_records(path)
    message = str(info.value)
    assert f"{path}:line 2:" in message and expected in message
    assert isinstance(info.value, LorakitError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "name, content, where",
    [
        # a line cut short: the error is at its end, not at "column 1" (of the next line)
        (
            "cut.jsonl",
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n',
            "line 2: .* at column 34",
        ),
        (
            "cut.json",
            '{"prompt": "a", "completion": "b"}\r\n{"prompt": "a", "completion": \r\n',
            "line 2: .* at column 31",
        ),
        ("gap.jsonl", '{"prompt": "a", "completion": }\n', "line 1: invalid JSON \\(Expecting value at column 31\\)"),
        # one pretty-printed object: where the document is wrong, not each of its lines
        (
            "pretty.json",
            '{\n  "prompt": "a",\n  "completion": \n}\n',
            "(?s)1 problem.*line 4: invalid JSON .* at column 1\\)",
        ),
        (
            "list.json",
            '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n',
            "line 3: .* at column 18",
        ),
    ],
)
def test_json_errors_give_the_line_and_column_an_editor_shows(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_bytes(content.encode())
    with pytest.raises(DataError, match=where):
        read_records(path)


def test_many_problems_are_reported_together(tmp_path):
    path = _write(tmp_path, "bad.jsonl", [{"prompt": "p", "completion": 1}] * 8)
    with pytest.raises(DataError, match=r"8 problems.*first 5") as info:
        read_records(path)
    assert "line 5:" in str(info.value) and "line 6:" not in str(info.value) and "3 more" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no records"):
        read_records(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported data format"):
        read_records(tmp_path / "d.txt")


def test_parquet_without_engine_says_what_to_install(tmp_path, monkeypatch):
    # Hide the engines (None in sys.modules makes `import` fail), so this runs where they are installed.
    for module in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, module, None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_records(tmp_path / "d.parquet")


def test_file_not_in_utf8_is_refused_with_advice(tmp_path):
    for name, text in (
        ("d.csv", "prompt,completion\ncaf\xe9,ok\n"),
        ("d.jsonl", '{"prompt": "caf\xe9", "completion": "x"}\n'),
    ):
        (tmp_path / name).write_bytes(text.encode("latin-1"))  # as a spreadsheet on Windows saves it
        with pytest.raises(DataError, match=rf"{name}: not UTF-8 text.*save the file as UTF-8"):
            read_records(tmp_path / name)


def test_json_file_with_one_pretty_printed_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}, indent=2))
    assert [(r.prompt, r.completion) for r in read_records(path)] == [("Hi", "Hello")]


# -- tokenizing and loss masks ----------------------------------------------------------------------


def test_prompt_completion_masks_all_but_completion_and_end_token(chat_tok):
    record = Record.from_prompt_completion("What is the capital of France?", "Paris.")
    (example,), stats = tokenize_records([record], chat_tok)
    assert [chat_tok.decode(run) for run in _supervised_runs(example)] == ["Paris.<|im_end|>"]
    # The unsupervised prefix is exactly the evaluation prompt, tokenized alone.
    prompt, reference = eval_pairs([record], chat_tok)[0]
    prefix = chat_tok(prompt, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: len(prefix)] == prefix and reference == "Paris."
    assert all(label == -100 for label in example["labels"][: len(prefix)])
    assert stats.n_examples == 1 and stats.supervised_tokens == len(_supervised_runs(example)[0])


def test_multi_turn_chat_supervises_only_assistant_turns(chat_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    (example,), _ = tokenize_records([Record.from_messages(messages)], chat_tok)
    assert [chat_tok.decode(run) for run in _supervised_runs(example)] == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    assert chat_tok.decode(example["input_ids"]) == chat_tok.apply_chat_template(messages, tokenize=False)
    prompt, reference = eval_pairs([Record.from_messages(messages)], chat_tok)[0]
    assert prompt.endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n") and reference == "Paris."


def test_default_system_prompt_template(chat_tok):
    tok = _train_tokenizer()
    tok.chat_template = CHATML_DEFAULT_SYSTEM
    record = Record.from_prompt_completion("Hello", '{"a": 1}')
    (example,), _ = tokenize_records([record], tok)
    assert [tok.decode(r) for r in _supervised_runs(example)] == ['{"a": 1}<|im_end|>']
    assert "You are a helpful assistant." in eval_pairs([record], tok)[0].prompt


def test_template_not_prefix_consistent_supervises_the_answer_not_the_question():
    # Rendering messages[:i] is not a prefix of the whole chat here (the marker moves to the last
    # turn), so the answer is searched for in the text; it also occurs in the user's turn.
    tok = _train_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}# final turn\n{% endif %}<|im_start|>"
        "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Say Paris"},
        {"role": "assistant", "content": "Paris"},
    ]
    (example,), _ = tokenize_records([Record.from_messages(messages)], tok)
    assert [tok.decode(r) for r in _supervised_runs(example)] == ["Hello<|im_end|>", "Paris<|im_end|>"]
    context = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == -100])
    assert "Say Paris<|im_end|>" in context  # the user's "Paris" stays context


def test_template_without_end_token_gets_eos(plain_tok):
    tok = _train_tokenizer()
    tok.chat_template = NO_STOP
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    (example,), _ = tokenize_records([Record.from_messages(messages)], tok)
    assert [tok.decode(r) for r in _supervised_runs(example)] == ["Hello", "Goodbye<|endoftext|>"]


def test_plain_tokenizer_concatenates_and_appends_eos(plain_tok):
    record = Record.from_prompt_completion("Q: capital of France?\nA:", " Paris")
    (example,), _ = tokenize_records([record], plain_tok)
    assert [plain_tok.decode(r) for r in _supervised_runs(example)] == [" Paris<|endoftext|>"]
    assert eval_pairs([record], plain_tok)[0] == ("Q: capital of France?\nA:", "Paris")


def test_text_records_supervise_every_token(plain_tok):
    (example,), _ = tokenize_records([Record.from_text("The quick brown fox.")], plain_tok)
    assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == plain_tok.eos_token_id
    assert eval_pairs([Record.from_text("x")], plain_tok) == []


def test_sentencepiece_style_tokenizer_keeps_masks_right():
    tok = _train_tokenizer(sentencepiece_style=True)
    tok.chat_template = CHATML
    (example,), _ = tokenize_records([Record.from_prompt_completion("What is the capital?", "Paris is.")], tok)
    (run,) = _supervised_runs(example)
    # Tokenizing the answer on its own would have given "▁P" (a space that is not in the text).
    assert tok.convert_ids_to_tokens(run)[0] == "P" and tok.convert_ids_to_tokens(run)[-1] == "<|im_end|>"


def test_chat_records_need_a_template(tmp_path, plain_tok):
    path = _write(
        tmp_path,
        "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(DataError, match=r"chat\.jsonl:line 1: cannot render.*chat template"):
        tokenize_records(read_records(path), plain_tok)


def test_truncation_counts_and_drops(chat_tok):
    short = Record.from_prompt_completion("Hi", "Hello there")
    long_prompt = Record.from_prompt_completion("word " * 200, "Paris")
    long_answer = Record.from_prompt_completion("Hi", "The quick brown fox jumps. " * 20)
    examples, stats = tokenize_records([short, long_prompt, long_answer], chat_tok, max_length=40)
    assert stats.n_records == 3 and stats.n_truncated == 2 and stats.n_dropped_all_truncated == 1
    assert stats.n_examples == len(examples) == 2 and all(len(e["input_ids"]) <= 40 for e in examples)
    assert stats.total_tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.mean_tokens == stats.total_tokens / 2 and stats.max_tokens == 40
    with pytest.raises(DataError, match="cut off by max_length=40"):
        tokenize_records([long_prompt, long_prompt], chat_tok, max_length=40)
    with pytest.raises(DataError, match="empty"):
        tokenize_records([], chat_tok)


def test_split_is_seeded_and_deterministic():
    records = [Record.from_text(f"doc {i}") for i in range(50)]
    train, valid = split_records(records, 0.2, seed=1)
    assert (train, valid) == split_records(records, 0.2, seed=1)
    assert valid != split_records(records, 0.2, seed=2)[1]
    assert len(valid) == 10 and len(train) == 40 and sorted(train + valid, key=records.index) == records
    assert train == sorted(train, key=records.index)  # input order kept
    assert split_records(records, 0.0) == (records, [])
    with pytest.raises(DataError):
        split_records(records[:1], 0.5)


def test_collator_pads_right(chat_tok):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = Collator(chat_tok)(examples)
    pad = chat_tok.pad_token_id
    assert set(batch) == {"input_ids", "labels", "attention_mask"} and all(
        t.dtype == torch.long for t in batch.values()
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert Collator(chat_tok, pad_to_multiple_of=8)(examples)["input_ids"].shape == (2, 8)
    assert Collator(pad_token_id=None)(examples)["input_ids"][1, 1] == 0
    with pytest.raises(LorakitError, match="pad_to_multiple_of"):
        Collator(chat_tok, pad_to_multiple_of=0)
    with pytest.raises(LorakitError, match="empty batch"):
        Collator(chat_tok)([])
    with pytest.raises(LorakitError, match="block_size"):
        pack_examples(examples, 1)


# -- demo task and metrics -------------------------------------------------------------------------


def test_demo_dataset_is_deterministic(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_train=60, n_test=20, seed=0)
    b = write_demo_dataset(tmp_path / "b", n_train=60, n_test=20, seed=0)
    c = write_demo_dataset(tmp_path / "c", n_train=60, n_test=20, seed=1)
    assert set(a) == {"train", "test"}
    assert a["train"].read_text() == b["train"].read_text() and a["test"].read_text() == b["test"].read_text()
    assert a["train"].read_text() != c["train"].read_text()
    assert len(read_records(a["train"])) == 60 and len(read_records(a["test"])) == 20


def test_demo_dataset_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "data"
    paths = write_demo_dataset(out, n_train=5, n_test=3)
    before = {split: path.read_text() for split, path in paths.items()}
    for bad in ({"n_train": 10, "n_test": 0}, {"n_train": -1, "n_test": 3}):
        with pytest.raises(LorakitError, match="at least 1"):
            write_demo_dataset(out, seed=7, **bad)
    # The failed calls changed nothing (the good split was not written before the bad one was refused).
    assert {split: path.read_text() for split, path in paths.items()} == before
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl"]  # no temporary files


def test_demo_values_are_verbatim_and_disjoint(tmp_path, chat_tok):
    paths = write_demo_dataset(tmp_path, n_train=400, n_test=80, seed=0)
    values: dict[str, dict[str, set]] = {}
    for split in ("train", "test"):
        records = read_records(paths[split])
        assert len({r.prompt for r in records}) == len(records)  # no duplicates
        values[split] = {key: set() for key in KEYS}
        for record in records:
            answer = json.loads(record.completion)
            assert tuple(answer) == KEYS and isinstance(answer["seats"], int)
            message = record.prompt.split("Message: ", 1)[1]
            for key, value in answer.items():
                if value is not None:
                    assert str(value) in message, (key, value, message)
                    values[split][key].add(value)
    words = lambda split: {w for name in values[split]["name"] for w in name.split()}  # noqa: E731
    assert not words("train") & words("test")
    for key in KEYS:
        assert values["train"][key] and values["test"][key]
        assert not values["train"][key] & values["test"][key], key
    test_records = read_records(paths["test"])
    assert any(json.loads(r.completion)["name"] is None for r in test_records)
    assert any(json.loads(r.completion)["loyalty"] is None for r in test_records)
    examples, _ = tokenize_records(test_records, chat_tok, max_length=256)
    assert len(examples) == 80  # fits the demo's max_length even with this tiny tokenizer's vocabulary


def test_exact_match_semantics():
    ref = '{"name": "Ann Lee", "seats": 3, "loyalty": null}'
    assert exact_match('{"seats": 3, "loyalty": null, "name": "Ann Lee"}', ref)
    assert exact_match('  {"name":"Ann Lee","seats":3.0,"loyalty":null}\n', ref)
    assert not exact_match('{"name": "Ann Lee", "seats": "3", "loyalty": null}', ref)
    assert not exact_match('{"name": "Ann Lee", "seats": 3}', ref)
    assert not exact_match('{"name": "Ann Lee", "seats": 3, "loyalty": null} and more', ref)
    assert not exact_match("", ref)
    assert not exact_match("true", "1") and exact_match("1", "1.0")
    assert exact_match(" Paris \n", "Paris") and not exact_match("paris", "Paris")


def test_parquet_prompt_completion_and_chat(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]),
        tmp_path / "pc.parquet",
    )
    records = read_records(tmp_path / "pc.parquet")
    assert [(r.kind, r.prompt, r.completion) for r in records] == [
        ("prompt_completion", "p1", "c1"),
        ("prompt_completion", "p2", "c2"),
    ]
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    (record,) = read_records(tmp_path / "chat.parquet")
    assert record.kind == "chat" and record.messages[1]["content"] == "hello"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p"}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        read_records(tmp_path / "bad.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_records(tmp_path / "corrupt.parquet")
