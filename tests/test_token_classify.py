"""Token classification (--task token-classify): data checks, tag alignment on multi-piece words,
entity F1 against hand-computed cases, a learned tagging task, and PEFT loading the adapter."""

import json
import math
import random

import pytest
import torch

import lorakit
from lorakit import ConfigError, DataError
from lorakit.tasks import make_task
from lorakit.tasks.metrics import entities, entity_scores, tags_have_entities
from lorakit.tasks.tag_data import WordAligner, word_spacing
from lorakit.tasks.token_classify import TagCollator
from lorakit.training.config import TrainConfig

WORDS = ["The", "unbelievably", "big", "New", "York"]
# A WordPiece vocabulary in which "unbelievably" is three pieces: un ##believ ##ably.
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "un", "##believ", "##ably", "new", "york", "big"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bert_tokenizer(tmp_path, vocab=BERT_VOCAB):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer.from_pretrained(tmp_path)


def byte_level_tokenizer():
    """A byte-level BPE (GPT-2's scheme) with hand-written merges: "The unbelievably big" is
    The | Ġun believ ably | Ġbig, the leading space of a word inside its first piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("Ġ", "u"), ("Ġu", "n"), ("b", "e"), ("be", "l"), ("i", "e"), ("bel", "ie"), ("belie", "v")]
    merges += [("a", "b"), ("ab", "l"), ("abl", "y"), ("T", "h"), ("Th", "e"), ("Ġ", "b"), ("Ġb", "i"), ("Ġbi", "g")]
    vocab = {c: i for i, c in enumerate(["<pad>", *sorted(set("Theunbelievablybig" + "Helloworld") | {"Ġ"})])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


class WithoutWordIds:
    """A tokenizer seen as a slow one (no word_ids()): the aligner must go word by word."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        return {"input_ids": self.tokenizer(text, **kwargs)["input_ids"]}


# --- entity F1 ----------------------------------------------------------------------------------


def test_entities_read_bio_as_conlleval_does():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entities(["I-PER", "I-PER", "O"]) == {("PER", 0, 2)}  # I- at the start opens an entity
    assert entities(["O", "I-LOC", "I-LOC"]) == {("LOC", 1, 3)}  # ... and after O
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}  # I- of another type: a new one
    assert entities(["B-PER", "B-PER", "I-PER"]) == {("PER", 0, 1), ("PER", 1, 3)}  # B- always opens
    assert entities(["B-PER", "O", "I-PER"]) == {("PER", 0, 1), ("PER", 2, 3)}
    assert entities(["S-PER", "B-LOC", "E-LOC", "E-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3), ("LOC", 3, 4)}
    assert entities(["PER", "PER", "O", "LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}  # IO: no prefixes
    assert entities(["O", "O"]) == set()
    assert tags_have_entities(["O", "B-PER"]) and not tags_have_entities(["0", "1", "NOUN"])


def test_entity_scores_are_micro_averaged_exact_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["O", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"], ["B-MISC", "O"]]
    # sentence 1: PER(0,2) vs PER(0,1) wrong span, LOC right; 2: ORG(1,3) right (I- opens it);
    # 3: a MISC nobody asked for. TP 2 of 4 predicted and 3 gold: P 1/2, R 2/3, F1 2·2/(4+3).
    scores = entity_scores(predicted, gold)
    assert scores["entity_precision"] == pytest.approx(0.5)
    assert scores["entity_recall"] == pytest.approx(2 / 3)
    assert scores["entity_f1"] == pytest.approx(4 / 7)
    assert entity_scores([["B-PER"]], [["B-LOC"]])["entity_f1"] == 0.0  # the type must match too
    none = entity_scores([["O"]], [["B-PER"]])
    assert none["entity_precision"] == 0.0 and none["entity_recall"] == 0.0 and none["entity_f1"] == 0.0
    assert all(math.isnan(v) for v in entity_scores([["O"]], [["O"]]).values())


# --- data ---------------------------------------------------------------------------------------


def test_bad_lines_are_reported_together_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            [
                json.dumps({"tokens": ["a", "b"], "tags": ["O", "B-X"]}),
                json.dumps({"tokens": ["a", "b"], "tags": ["O"]}),  # wrong length
                json.dumps({"tokens": ["a"]}),  # no tags
                json.dumps({"tokens": ["a", " "], "tags": ["O", True]}),  # blank word, bool tag
                json.dumps(["a", "b"]),
            ]
        )
        + "\n"
    )
    with pytest.raises(DataError) as info:
        make_task(TrainConfig(data=str(bad), task="token-classify"))
    message = str(info.value)
    assert "5 problems" in message, message
    assert "line 2: 1 tags for 2 tokens: give exactly one tag per word" in message
    assert "line 3: 'tags' is missing" in message
    assert "line 4: tokens[1] is ' '" in message and "line 4: tags[1] is True" in message
    assert "line 5: expected an object with tokens and tags, got list" in message
    # Words that tokenize to nothing are found when tokenizing, and reported together too.
    blank = [{"tokens": ["the", "\u200b"], "tags": ["O", "O"]}, {"tokens": ["big"], "tags": ["O"]}]
    task = make_task(TrainConfig(data=write_jsonl(tmp_path / "z.jsonl", [*blank, blank[0]]), task="token-classify"))
    with pytest.raises(DataError, match=r"(?s)2 problems.*z\.jsonl:line 1: word 1.*z\.jsonl:line 3: word 1"):
        task.prepare_data(bert_tokenizer(tmp_path))


def test_tag_order_and_unseen_validation_tags(tmp_path):
    rows = [{"tokens": ["a", "b"], "tags": ["B-X", "O"]}, {"tokens": ["c"], "tags": ["I-X"]}]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    assert make_task(TrainConfig(data=train, task="token-classify")).labels == ["B-X", "O", "I-X"]
    fixed = make_task(TrainConfig(data=train, task="token-classify", labels="O,B-X,I-X"))
    assert fixed.labels == ["O", "B-X", "I-X"] and fixed.cfg.labels == ["O", "B-X", "I-X"]
    ints = write_jsonl(tmp_path / "i.jsonl", [{"tokens": ["a", "b"], "tags": [2, 0]}])
    assert make_task(TrainConfig(data=ints, task="token-classify")).labels == ["0", "1", "2"]
    valid = write_jsonl(tmp_path / "v.jsonl", [rows[0], {"tokens": ["d", "e"], "tags": ["O", "B-Y"]}])
    with pytest.raises(DataError, match=r"v\.jsonl:line 2: label 'B-Y' is not one of"):
        make_task(TrainConfig(data=train, valid_data=valid, task="token-classify"))
    with pytest.raises(ConfigError, match="packing"):
        make_task(TrainConfig(data=train, task="token-classify", packing=True))


# --- alignment ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slow", [False, True], ids=["word_ids", "word-by-word"])
def test_wordpiece_alignment_by_hand(tmp_path, slow):
    fast = bert_tokenizer(tmp_path)
    tokenizer = WithoutWordIds(fast) if slow else fast
    aligned = WordAligner(tokenizer, max_length=32)(WORDS, [0, 1, 2, 3, 4])
    # [CLS] the un ##believ ##ably big new york [SEP]: the tag on each word's first piece only
    assert fast.convert_ids_to_tokens(aligned["input_ids"]) == [
        "[CLS]", "the", "un", "##believ", "##ably", "big", "new", "york", "[SEP]",
    ]  # fmt: skip
    assert aligned["labels"] == [-100, 0, 1, -100, -100, 2, 3, 4, -100]
    assert aligned["input_ids"] == fast(WORDS, is_split_into_words=True)["input_ids"]  # the HF convention
    assert aligned["n_words"] == 5 and not aligned["truncated"]
    cut = WordAligner(tokenizer, max_length=5)(WORDS, [0, 1, 2, 3, 4])  # room for 3 pieces: the un ##believ
    assert cut["labels"] == [-100, 0, 1, -100, -100] and cut["n_words"] == 2 and cut["truncated"]
    with pytest.raises(DataError, match=r"word 1 \('\\u200b'\) tokenizes to nothing"):
        WordAligner(tokenizer, max_length=32)(["the", "\u200b"], [0, 1])  # a zero-width space


@pytest.mark.parametrize("slow", [False, True], ids=["word_ids", "word-by-word"])
def test_byte_level_alignment_by_hand(slow):
    fast = byte_level_tokenizer()
    tokenizer = WithoutWordIds(fast) if slow else fast
    assert word_spacing(tokenizer) == " "  # words after the first carry their space, as in running text
    aligned = WordAligner(tokenizer, max_length=32)(["The", "unbelievably", "big"], [5, 6, 7])
    assert fast.convert_ids_to_tokens(aligned["input_ids"]) == ["The", "Ġun", "believ", "ably", "Ġbig"]
    assert aligned["input_ids"] == fast("The unbelievably big")["input_ids"]
    assert aligned["labels"] == [5, 6, -100, -100, 7]


@pytest.mark.e2e
@pytest.mark.parametrize("slow", [False, True], ids=["word_ids", "word-by-word"])
def test_embedded_tokenizer_alignment_by_hand(slow):
    """The embedded model's tokenizer (byte-level BPE, converted from GGUF) splits the words as
    the sentence would be split."""
    from transformers import AutoTokenizer

    from lorakit.models.aliases import ALIASES
    from lorakit.models.gguf import cached_wheel_model

    fast = AutoTokenizer.from_pretrained(cached_wheel_model(ALIASES["smollm2-135m"]))
    tokenizer = WithoutWordIds(fast) if slow else fast
    aligned = WordAligner(tokenizer, max_length=32)(["Hello", "unbelievably", "Zürich"], [1, 2, 3])
    pieces = fast.convert_ids_to_tokens(aligned["input_ids"])
    assert pieces == ["Hello", "Ġunbelie", "v", "ably", "ĠZ", "Ã¼", "rich"]  # ü is two bytes: Ã¼
    assert aligned["labels"] == [1, 2, -100, -100, 3, -100, -100]
    assert aligned["input_ids"] == fast("Hello unbelievably Zürich")["input_ids"]


def test_collate_pads_labels_with_ignore():
    batch = TagCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 1, 2]}, {"input_ids": [8], "labels": [0]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 1, 2], [0, -100, -100]]


# --- training, PEFT -----------------------------------------------------------------------------

# Names in two pieces for the WordPiece tokenizer (an ##na), cities, and filler words.
NAMES, CITIES, FILLER = ["anna", "bob", "carl", "dora"], ["paris", "rome", "oslo", "lima"], ["met", "in", "saw", "and"]
TAG_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "##na", "bob", "carl", "do", "##ra"]
TAG_VOCAB += ["paris", "rome", "oslo", "lima", "met", "in", "saw", "and"]


def tagged(n, seed):
    """ "NAME [NAME] met NAME in CITY" sentences: B-PER/I-PER for one- or two-word names, B-LOC,
    O; the tag of a name's second word (I-PER, not B-PER) depends on the word before it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        for i, part in enumerate(rng.sample(["name", "name", "city"], 3)):
            if i:
                words.append(rng.choice(FILLER))
                tags.append("O")
            if part == "city":
                words.append(rng.choice(CITIES))
                tags.append("B-LOC")
            else:
                for j in range(rng.randint(1, 2)):
                    words.append(rng.choice(NAMES))
                    tags.append("I-PER" if j else "B-PER")
        rows.append({"tokens": words, "tags": tags})
    return rows


def save_tiny(tmp_path, kind, labels, head="token"):
    """A tiny Llama or BERT token (or, ``head="sequence"``, sequence) classifier with the WordPiece
    tokenizer, saved as a directory."""
    import transformers
    from transformers import BertConfig, LlamaConfig

    if kind == "llama":
        config = LlamaConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=labels, pad_token_id=0,
        )  # fmt: skip
        make = getattr(transformers, f"LlamaFor{head.title()}Classification")
    else:
        config = BertConfig(
            vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=labels,
        )  # fmt: skip
        make = getattr(transformers, f"BertFor{head.title()}Classification")
    torch.manual_seed(0)
    directory = tmp_path / f"{kind}-{head}"
    make(config).save_pretrained(directory)
    bert_tokenizer(directory, TAG_VOCAB).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_tagging_task_is_learned_and_peft_loads_the_adapter(tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    train = write_jsonl(tmp_path / "train.jsonl", tagged(200, seed=0))
    valid = write_jsonl(tmp_path / "valid.jsonl", tagged(40, seed=1))
    directory = save_tiny(tmp_path, kind, labels=4)
    model = AutoModelForTokenClassification.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    result = lorakit.train(
        loaded=(model, tokenizer), task="token-classify", labels="O,B-PER,I-PER,B-LOC", data=train,
        valid_data=valid, output_dir=str(tmp_path / "run"), device="cpu", r=8, alpha=16, lr=1e-2, epochs=4,
        batch_size=16, warmup_steps=5, progress=False,
    )  # fmt: skip
    final = result.final_eval
    if kind == "llama":
        assert final["token_accuracy"] >= 0.95 and final["entity_f1"] >= 0.9, final
    else:  # BERT's absolute positions learn "the word before is a name" slower (~30 epochs to 0.95) than RoPE
        assert final["token_accuracy"] >= 0.85 and final["entity_f1"] >= 0.6, final
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["O", "B-PER", "I-PER", "B-LOC"]
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    head = "score" if kind == "llama" else "classifier"
    assert saved["task_type"] == "TOKEN_CLS" and saved["modules_to_save"] == [head]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_entity_f1" in r for r in records)

    batch = tokenizer(["anna bob met carl in rome", "dora saw lima"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
        base = AutoModelForTokenClassification.from_pretrained(directory).eval()
        before = base(**batch).logits
        theirs = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()(**batch).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, batch["input_ids"].shape[1], 4)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert not torch.allclose(before, ours)  # the head and adapter did change the logits


def test_load_model_as_token_classifier(tmp_path):
    from lorakit.models import load_model

    directory = save_tiny(tmp_path, "llama", labels=4)
    model, _ = load_model(str(directory), device="cpu", task="token-classification", num_labels=3)
    assert type(model).__name__ == "LlamaForTokenClassification" and model.config.num_labels == 3
    with pytest.raises(ConfigError, match="token-classification"):
        load_model(str(directory), device="cpu", task="tagging")
