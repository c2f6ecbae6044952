"""The engine's parts on their own: sampling, the text stream with stop strings, the batch cache."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.serve import detokenize as streaming
from lorakit.serve.batch_state import BatchState
from lorakit.serve.detokenize import TextStream
from lorakit.serve.requests import SamplingParams
from lorakit.serve.sampling import _nucleus, check_sampling, next_tokens, row_generator


class CharTokenizer:
    """Token i is the i-th character of ``alphabet``: decoding is joining (enough for stop strings)."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids)

    def ids(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]


def _stream_all(text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .!")
    stream = TextStream(tok, stop)
    pieces = []
    for i in tok.ids(text):
        pieces.append(stream.add(i))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_text_stream_cuts_at_the_stop_string_and_holds_back_its_prefix():
    pieces, stream = _stream_all("hello world. bye", ["world."])
    assert "".join(pieces) == "hello "
    assert stream.stopped
    # "w", "wo"... were held back while they could still become the stop string.
    assert all("w" not in p for p in pieces)


def test_text_stream_releases_a_prefix_that_did_not_become_a_stop_string():
    pieces, stream = _stream_all("say wow now", ["world"])
    assert "".join(pieces) == "say wow now"
    assert not stream.stopped


def test_text_stream_earliest_of_several_stop_strings():
    pieces, _ = _stream_all("abc def ghi", ["ghi", "def"])
    assert "".join(pieces) == "abc "


def test_text_stream_holds_back_an_incomplete_character():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), [])
    euro = "€".encode()
    assert [stream.add(b) for b in euro] == ["", "", "€"]


@pytest.mark.parametrize(
    "field,value",
    [("max_tokens", 0), ("max_tokens", 10_000), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("seed", 1.5)],
)
def test_sampling_values_that_mean_nothing_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        check_sampling(SamplingParams(**{field: value}), max_tokens_cap=4096)


def test_greedy_takes_the_first_maximum():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    assert next_tokens(logits, [SamplingParams(temperature=0)] * 2, [None, None]) == [1, 0]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    kept = _nucleus(probs.log(), 0.79).isfinite().tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.79
    kept = _nucleus(probs.log(), 0.81).isfinite().tolist()
    assert kept == [True, True, True, False]
    assert _nucleus(probs.log(), 0.1).isfinite().tolist() == [True, False, False, False]


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    fallback = torch.Generator().manual_seed(0)

    alone = []
    gen = row_generator(params, "cpu", fallback)
    for _ in range(5):
        alone.append(next_tokens(logits[1:2], [params], [gen])[0])
    gen_batch = [
        row_generator(SamplingParams(temperature=1.0), "cpu", fallback),
        row_generator(params, "cpu", fallback),
    ]
    batched = []
    for _ in range(5):
        batched.append(next_tokens(logits[:2], [SamplingParams(temperature=1.0), params], gen_batch)[1])
    assert alone == batched


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    params = SamplingParams(temperature=1.0, seed=0)
    gen = row_generator(params, "cpu", torch.Generator())
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[next_tokens(logits, [params], [gen])[0]] += 1
    expected = torch.softmax(logits[0], -1) * 3000
    assert torch.allclose(counts, expected, atol=90)  # about 4 standard deviations


def _cache(rows: int, length: int, seed: int):
    from transformers import DynamicCache

    torch.manual_seed(seed)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4), layer)
    return cache


def test_batch_join_pads_left_and_keep_trims_columns_only_padding_uses():
    a = BatchState(_cache(2, 3, 0), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    b = BatchState(_cache(1, 5, 1), torch.tensor([[0, 1, 1, 1, 1]]))
    keys_b = b.cache.layers[0].keys.clone()
    keys_a = a.cache.layers[1].keys.clone()
    a.join(b)
    assert a.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert a.positions.tolist() == [3, 2, 4]
    assert torch.equal(a.cache.layers[0].keys[2], keys_b[0])
    assert torch.equal(a.cache.layers[1].keys[0, :, 2:], keys_a[0])
    assert not a.cache.layers[1].keys[0, :, :2].any()
    a.keep(torch.tensor([1, 0]))  # the longest row leaves: two columns are padding everywhere
    assert a.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert torch.equal(a.cache.layers[1].keys[1], keys_a[0])
    mask, positions = a.step_inputs()
    assert mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and positions.tolist() == [[2], [3]]


def test_outbox_wakes_each_event_loop_once_per_step_and_keeps_each_handles_order():
    import asyncio
    import threading

    from lorakit.serve.requests import Delta, GenerationRequest, Outbox, RequestHandle

    loop = asyncio.new_event_loop()
    wakeups = []
    original = loop.call_soon_threadsafe

    def counted(*args):
        wakeups.append(args)
        return original(*args)

    loop.call_soon_threadsafe = counted
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    request = GenerationRequest("r", [1], None, SamplingParams())
    handles = [RequestHandle(request, loop=loop) for _ in range(3)]
    plain = RequestHandle(request)  # no loop: its delta arrives at once
    outbox = Outbox()
    for step in range(2):
        for i, handle in enumerate(handles):
            outbox.add(handle, Delta(f"{i}{step}", [step], 1, step + 1))
        outbox.add(plain, Delta(f"p{step}", [step], 1, step + 1))
        assert plain.next_delta(timeout=1).text == f"p{step}"
        outbox.flush()
    outbox.add(handles[0], Delta("", [], 1, 2, finish_reason="stop"))
    outbox.flush()
    assert len(wakeups) == 3  # one per step, not one per delta

    async def texts(handle):
        return [delta.text async for delta in handle]

    got = [asyncio.run_coroutine_threadsafe(texts(handles[0]), loop).result(timeout=5)]
    assert got == [["00", "01", ""]]
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
    outbox.add(handles[1], Delta("late", [], 1, 3))
    outbox.flush()  # the loop is closed: nobody listens, the request is cancelled
    assert handles[1].cancelled.is_set()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from lorakit.models import load_model

    return load_model("smollm2-135m", device="cpu")[1]


def _streamed(tokenizer, ids: list[int]) -> str:
    stream = TextStream(tokenizer, [])
    return "".join(stream.add(i) for i in ids) + stream.finish()


def test_text_stream_gives_the_whole_decode_with_a_real_tokenizer(smollm2_tokenizer):
    """Window by window, the text is what decoding every token at once gives: multi-byte
    characters split over tokens, spaces, newlines, special tokens skipped; random ids too (bytes
    that never form a character decode as U+FFFD in both, bar a trailing one still waiting)."""
    tok = smollm2_tokenizer
    text = "Grüße aus Köln — 東京で寿司🍣を食べた!\n  indented\tand 12345 numbers, ½ ≠ ∞."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert _streamed(tok, ids) == tok.decode(ids, skip_special_tokens=True) == text
    special = [tok.convert_tokens_to_ids("<|im_start|>")] + ids[:5] + [tok.eos_token_id] + ids[5:]
    assert _streamed(tok, special) == tok.decode(special, skip_special_tokens=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        noise = torch.randint(0, len(tok), (300,), generator=gen).tolist()
        streamed, whole = _streamed(tok, noise), tok.decode(noise, skip_special_tokens=True)
        assert whole.startswith(streamed) and not whole[len(streamed) :].strip("\ufffd")


def test_text_stream_decodes_a_short_window_per_token(smollm2_tokenizer):
    """Each token costs decoding a few tokens, however long the completion (whole decodes made
    a request's detokenization quadratic in its length)."""
    decoded = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return smollm2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    tok = smollm2_tokenizer
    ids = tok(" the quick brown fox jumps over the lazy dog" * 100)["input_ids"]
    _streamed(Counting(), ids)
    assert len(ids) >= 900 and max(decoded) <= 3
    # Runs that add no text (EOS under ignore_eos) or bytes that never form a character.
    byte = next(i for i in range(len(tok)) if tok.decode([i]) == "\ufffd")
    hello = tok("Hello world")["input_ids"]
    for run in ([tok.eos_token_id] * 500, [byte] * 500):
        decoded.clear()
        ids = hello + run + hello
        assert _streamed(Counting(), ids) == tok.decode(ids, skip_special_tokens=True)
        assert max(decoded) <= 2 * streaming.MAX_PENDING


def test_text_stream_cuts_at_the_earliest_stop_string_within_one_token():
    class Words:
        words = ["abc def ghi jkl"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.words[i] for i in ids)

    for stop in (["def", "ghi"], ["ghi", "def"]):
        stream = TextStream(Words(), stop)
        assert stream.add(0) + stream.finish() == "abc "
        assert stream.stopped
