"""Hugging Face `datasets` as training data (a ``save_to_disk`` folder, a name in the local cache),
column mapping, and the alpaca / ShareGPT instruction formats, read through `prepare_data` as
``lorakit train`` reads them. Offline: every dataset is built here."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest

from lorakit.data import read_records
from lorakit.data.records import Record
from lorakit.errors import ConfigError, DataError
from lorakit.training.config import TrainConfig
from lorakit.training.run import prepare_data

from .test_data import CHATML, _train_tokenizer

QA = [
    {"question": "What is the capital of France?", "answer": "Paris.", "id": 1},
    {"question": "2+2?", "answer": "4", "id": 2},
    {"question": "Hi there", "answer": "Hello!", "id": 3},
]
# One conversation in each format, and in lorakit's own chat format.
ALPACA = [
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
]
ALPACA_AS_CHAT = [
    [{"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi there"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
        ]
    },
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]
SHAREGPT_AS_CHAT = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module")
def chat_tok():
    tok = _train_tokenizer()
    tok.chat_template = CHATML
    return tok


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _saved(path, splits):
    """A Dataset (``splits`` a list of rows) or a DatasetDict (a dict of them) saved to disk."""
    datasets = pytest.importorskip("datasets")
    if isinstance(splits, dict):
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    else:
        datasets.Dataset.from_list(splits).save_to_disk(str(path))
    return path


def _prepared(tok, **options):
    return prepare_data(TrainConfig(**options), tok)


def _chat_jsonl(path, conversations):
    return _jsonl(path, [{"messages": m} for m in conversations])


# -- saved datasets and column mapping ---------------------------------------------------------------


def test_saved_dataset_trains_like_the_same_jsonl(tmp_path, chat_tok):
    saved = _saved(tmp_path / "qa", QA)
    plain = _jsonl(tmp_path / "qa.jsonl", [{"prompt": r["question"], "completion": r["answer"]} for r in QA])
    got = _prepared(chat_tok, data=str(saved), data_columns="prompt=question,completion=answer", valid_ratio=0.34)
    want = _prepared(chat_tok, data=str(plain), valid_ratio=0.34)
    assert got.train == want.train and got.valid == want.valid and got.valid_pairs == want.valid_pairs
    records = read_records(saved, columns={"prompt": "question", "completion": "answer"})
    assert records[1].source == f"{saved}:row 2"


def test_column_mapping_in_a_jsonl_file_too(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", QA)
    records = read_records(path, columns={"prompt": "question", "completion": "answer"})
    assert [(r.prompt, r.completion) for r in records] == [(r["question"], r["answer"]) for r in QA]
    cfg = TrainConfig(data=str(path), data_columns={"prompt": "question", "completion": "answer"})  # from YAML
    assert cfg.data_columns == "prompt=question,completion=answer"


def test_dataset_dict_splits(tmp_path, chat_tok):
    splits = {"train": QA[:2], "validation": QA[2:], "test": QA[1:2]}
    saved = _saved(tmp_path / "qa", splits)
    columns = "prompt=question,completion=answer"
    data = _prepared(chat_tok, data=str(saved), valid_data=str(saved), data_columns=columns)
    assert len(data.train) == 2 and [p.reference for p in data.valid_pairs] == ["Hello!"]  # train; validation
    data = _prepared(
        chat_tok, data=str(saved), data_split="test", valid_data=str(saved), valid_split="train", data_columns=columns
    )
    assert len(data.train) == 1 and [p.reference for p in data.valid_pairs] == ["Paris.", "4"]
    no_validation = _saved(tmp_path / "qa2", {"train": QA[:2], "test": QA[2:]})
    data = _prepared(chat_tok, data=str(no_validation), valid_data=str(no_validation), data_columns=columns)
    assert [p.reference for p in data.valid_pairs] == ["Hello!"]  # test, as there is no validation split


def test_cached_dataset_name_is_read_offline(tmp_path, monkeypatch, chat_tok):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    # The layout load_dataset leaves in the cache for the hub dataset "lorakit-test/tiny_qa".
    files = {"train": str(_jsonl(tmp_path / "train.jsonl", QA)), "test": str(_jsonl(tmp_path / "test.jsonl", QA[:1]))}
    builder = Json(
        data_files=DataFilesDict.from_patterns({k: [v] for k, v in files.items()}),
        dataset_name="lorakit-test___tiny_qa",
        hash="0123abcd",
        cache_dir=str(cache),
    )
    builder.download_and_prepare()
    root = cache / "lorakit-test___tiny_qa"
    (config_dir,) = glob.glob(str(root / "default-*"))
    os.rename(config_dir, root / "default")
    for arrow in glob.glob(str(root / "default" / "*" / "*" / "*.arrow")):
        os.rename(arrow, arrow.replace("lorakit-test___tiny_qa-", "tiny_qa-"))
    offline = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE

    data = _prepared(chat_tok, data="lorakit-test/tiny_qa", data_columns="prompt=question,completion=answer")
    assert len(data.train) == 3
    records = read_records("lorakit-test/tiny_qa", split="test", columns={"prompt": "question", "completion": "answer"})
    assert [r.prompt for r in records] == [QA[0]["question"]] and records[
        0
    ].source == "lorakit-test/tiny_qa[test]:row 1"
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == offline  # put back as they were

    with pytest.raises(DataError, match=r"^lorakit-test/not_here: .*nor a dataset in the local Hugging Face cache"):
        read_records("lorakit-test/not_here")


# -- alpaca and ShareGPT ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, conversations",
    [(ALPACA, ALPACA_AS_CHAT), (SHAREGPT, SHAREGPT_AS_CHAT)],
    ids=["alpaca", "sharegpt"],
)
@pytest.mark.parametrize("source", ["jsonl", "saved"])
def test_instruction_formats_render_as_the_same_chat(tmp_path, chat_tok, rows, conversations, source):
    path = _jsonl(tmp_path / "rows.jsonl", rows) if source == "jsonl" else _saved(tmp_path / "rows", rows)
    records = read_records(path)
    assert records == [Record.from_messages(m) for m in conversations]
    ours = _chat_jsonl(tmp_path / "ours.jsonl", conversations)
    got = _prepared(chat_tok, data=str(path), valid_data=str(path))
    want = _prepared(chat_tok, data=str(ours), valid_data=str(ours))
    assert got.train == want.train and got.valid_pairs == want.valid_pairs
    assert chat_tok.decode(got.train[0]["input_ids"]) == chat_tok.apply_chat_template(conversations[0], tokenize=False)


def test_alpaca_system_and_extra_text_column(tmp_path):
    # tatsu-lab/alpaca also has a "text" column (the filled-in prompt): the row is still alpaca.
    row = {
        "instruction": "Say hello.",
        "input": None,
        "output": "Hello!",
        "text": "### Instruction: ...",
        "system": "Be kind.",
    }
    (record,) = read_records(_jsonl(tmp_path / "a.jsonl", [row]))
    assert record.messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_mapped_columns_make_an_instruction_format(tmp_path):
    rows = [{"dialog": SHAREGPT[1]["conversations"]}]
    (record,) = read_records(_jsonl(tmp_path / "d.jsonl", rows), columns={"conversations": "dialog"})
    assert record.messages == SHAREGPT_AS_CHAT[1]


# -- errors -----------------------------------------------------------------------------------------------


def test_bad_instruction_rows_are_reported_up_front_with_their_row(tmp_path):
    alpaca = [ALPACA[0], {"instruction": "Say hello.", "input": ""}, {"instruction": "", "output": "x"}]
    with pytest.raises(DataError) as e:
        read_records(_jsonl(tmp_path / "a.jsonl", alpaca))
    assert "a.jsonl:line 2: missing key 'output'" in str(e.value)
    assert "a.jsonl:line 3: 'instruction' is empty" in str(e.value)
    sharegpt = [SHAREGPT[1], {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]}]
    with pytest.raises(DataError) as e:
        read_records(_saved(tmp_path / "s", sharegpt))
    assert "s:row 2: conversations[1] has unknown from 'bot'; expected one of human, user, gpt" in str(e.value)
    mixed = [ALPACA[0], SHAREGPT[1]]
    with pytest.raises(DataError, match=r"line 2: mixed shapes: this row is 'sharegpt' but line 1 is 'alpaca'"):
        read_records(_jsonl(tmp_path / "m.jsonl", mixed))


def test_unknown_split(tmp_path):
    saved = _saved(tmp_path / "qa", {"train": QA, "test": QA})
    columns = {"prompt": "question", "completion": "answer"}
    with pytest.raises(
        DataError, match=r"qa: no split 'valid'; its splits are 'train', 'test' \(choose one with --data-split\)"
    ):
        read_records(saved, split="valid", columns=columns)
    only_train = _saved(tmp_path / "tr", {"train": QA})
    cfg = TrainConfig(
        data=str(only_train), valid_data=str(only_train), data_columns="prompt=question,completion=answer"
    )
    with pytest.raises(
        DataError, match=r"no split 'validation'; its splits are 'train' \(choose one with --valid-split"
    ):
        prepare_data(cfg, None)  # refused before any tokenizing
    single = _saved(tmp_path / "one", QA)
    with pytest.raises(
        DataError, match=r"one Dataset without splits, so split 'test' does not apply; drop --data-split"
    ):
        read_records(single, split="test", columns=columns)
    with pytest.raises(DataError, match=r"a file without splits"):
        read_records(_jsonl(tmp_path / "qa.jsonl", QA), split="test", columns=columns)


def test_unknown_column(tmp_path):
    saved = _saved(tmp_path / "qa", QA)
    with pytest.raises(
        DataError, match=r"qa: no column 'questoin' \(--data-columns\); its columns are 'question', 'answer', 'id'"
    ):
        read_records(saved, columns={"prompt": "questoin", "completion": "answer"})
    with pytest.raises(
        DataError, match=r"columns 'question', 'answer', 'id'; expected .* \(map yours with --data-columns"
    ):
        read_records(saved)
    with pytest.raises(DataError, match=r"qa.jsonl:line 1: no column 'questoin' \(--data-columns\)"):
        read_records(_jsonl(tmp_path / "qa.jsonl", QA), columns={"prompt": "questoin", "completion": "answer"})
    with pytest.raises(ConfigError, match=r"unknown field 'question'; the fields are prompt, completion"):
        TrainConfig(data=str(saved), data_columns="question=prompt")
    with pytest.raises(ConfigError, match=r"'prompt' is not FIELD=COLUMN"):
        TrainConfig(data=str(saved), data_columns="prompt")


def test_missing_name_or_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(DataError) as e:
        read_records("nobody/not-cached")
    message = str(e.value)
    assert "\n" not in message and "lorakit never downloads data" in message and "not-cached" in message
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="is a directory but not a saved dataset"):
        read_records(tmp_path / "folder")
    with pytest.raises(DataError, match="data file not found"):
        read_records(tmp_path / "missing.jsonl")


# -- the command line -------------------------------------------------------------------------------------


def test_lorakit_train_on_a_saved_dataset_dict(tmp_path, monkeypatch, capsys, chat_tok):
    """``lorakit train --data FOLDER --data-split ... --data-columns ...`` end to end (a tiny model)."""
    import yaml

    import lorakit.models
    from lorakit.cli.main import main

    from .tiny import tiny_llama

    monkeypatch.setattr(lorakit.models, "load_model", lambda *a, **k: (tiny_llama(vocab=len(chat_tok)), chat_tok))
    saved = _saved(tmp_path / "qa", {"train": QA, "test": QA[:1]})
    out = tmp_path / "run"
    argv = ["train", "--data", str(saved), "--valid-data", str(saved), "--output-dir", str(out), "--device", "cpu"]
    argv += ["--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "2"]
    capsys.readouterr()  # save_to_disk's progress bars
    assert main([*argv, "--data-split", "validation"]) == 2  # refused before anything is written
    assert capsys.readouterr().err == (
        f"error: {saved}: no split 'validation'; its splits are 'train', 'test' (choose one with --data-split)\n"
    )
    assert not out.exists()
    assert main([*argv, "--data-columns", "prompt=question,completion=answer"]) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == 1
    recorded = yaml.safe_load((out / "train_config.yaml").read_text())
    assert recorded["data_columns"] == "prompt=question,completion=answer" and recorded["valid_split"] is None
    assert (
        len((out / "eval_predictions.jsonl").read_text().splitlines()) == 1
    )  # the test split, as there is no validation


def test_lorakit_eval_on_a_saved_dataset_dict(tmp_path, monkeypatch, capsys, chat_tok):
    """``lorakit eval --data FOLDER --data-split ... --data-columns ...``: the split and the
    columns are read as train reads them, and a wrong split is refused before the model loads."""
    import lorakit.models
    from lorakit.cli.main import main

    from .tiny import tiny_llama

    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return tiny_llama(vocab=len(chat_tok)), chat_tok

    monkeypatch.setattr(lorakit.models, "load_model", load)
    import lorakit.data

    tokenized, tokenize = [], lorakit.data.tokenize_records
    monkeypatch.setattr(
        lorakit.data,
        "tokenize_records",
        lambda records, *a, **k: tokenized.append(records) or tokenize(records, *a, **k),
    )
    saved = _saved(tmp_path / "qa", {"train": QA, "test": QA[:2]})
    argv = ["eval", "--data", str(saved), "--device", "cpu", "--no-generate", "--json"]
    capsys.readouterr()  # save_to_disk's progress bars
    assert main([*argv, "--data-split", "validation"]) == 2
    assert "no split 'validation'" in capsys.readouterr().err and not loads
    assert main([*argv, "--data-split", "test", "--data-columns", "prompt=question,completion=answer"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert loads and math.isfinite(result["loss"])
    assert [(r.prompt, r.completion) for r in tokenized[0]] == [(q["question"], q["answer"]) for q in QA[:2]]
