"""Streaming detokenization cost per token: ``serve.detokenize.TextStream`` (a short window
decoded per token) against decoding the whole completion at every token (what it did before),
with the embedded SmolLM2 tokenizer, at completions of 128, 512 and 2048 tokens.

    python bench/detokenize.py

Prints, per length, the mean time per token over the completion and the time of its last token
(the per-step cost a row of that length adds to every engine step).
"""

from __future__ import annotations

import time

from lorakit.models import load_model
from lorakit.serve.detokenize import TextStream


class WholeDecode:
    """The baseline: every token decodes all of the completion's ids again."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids = tokenizer, []

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def main() -> None:
    _, tokenizer = load_model("smollm2-135m", device="cpu")
    ids = tokenizer(" the quick brown fox jumps over the lazy dog. Grüße 東京" * 300)["input_ids"]
    print("| tokens | streamer | mean per token | last token |")
    print("|---|---|---|---|")
    for length in (128, 512, 2048):
        for name, make in (
            ("TextStream (window)", lambda: TextStream(tokenizer, [])),
            ("whole decode", lambda: WholeDecode(tokenizer)),
        ):
            stream = make()
            total = last = 0.0
            for token in ids[:length]:
                started = time.perf_counter()
                stream.add(token)
                last = time.perf_counter() - started
                total += last
            print(f"| {length} | {name} | {total / length * 1e6:.1f} µs | {last * 1e6:.1f} µs |")


if __name__ == "__main__":
    main()
