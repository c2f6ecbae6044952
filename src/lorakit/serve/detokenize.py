"""Turning one row's tokens into text as they come: new text per step, stop strings cut out,
and text that could still become a stop string (or an incomplete UTF-8 character) held back.

Each step decodes a short window, not the whole completion: the tokens since the last text came
out plus the token(s) before them, the latter decoded alone too and their text subtracted.
Decoding the whole list every step cost time growing with the completion's length (quadratic
over a request; docs/benchmarks.md); the window keeps what whole decoding gets right — a token's
text can depend on the token before it (SentencePiece's leading space) and a character can span
tokens — as vLLM's and TGI's incremental detokenizers do. The window stays short: a token that
adds no text (a skipped special token) leaves it, and bytes that have not formed a character
after ``MAX_PENDING`` tokens are shown as the replacement character whole decoding shows
(a UTF-8 character has at most 4 bytes).
"""

from __future__ import annotations

# What a tokenizer's decode shows for bytes that do not yet form a whole character.
_INCOMPLETE = "\ufffd"
MAX_PENDING = 6  # tokens an incomplete character may span before it is shown as it decodes


class TextStream:
    """The text of one request's completion so far. ``add`` takes the next token and returns the
    text that can be shown now; ``stopped`` is set once a stop string appeared (the text ends
    before it, as OpenAI's API returns it)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window: list[int] = []  # the last shown token(s), then tokens whose text is not out yet
        self.shown = 0  # how many tokens at the window's start were shown already
        self.text = ""  # decoded so far (up to a stop string, if one appeared)
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        window = self.window
        window.append(token_id)
        decode = self.tokenizer.decode
        before = decode(window[: self.shown], skip_special_tokens=True)
        now = decode(window, skip_special_tokens=True)
        if len(now) <= len(before) and not now.endswith(_INCOMPLETE):
            window.pop()  # no text from this token (a skipped special token): it adds nothing later either
            return ""
        if now.endswith(_INCOMPLETE) and len(window) - self.shown < MAX_PENDING:
            return ""  # the next token may complete the character
        self.window = window[self.shown :]
        self.shown = len(self.window)
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        full = self.text + now[len(before) :]
        self.text = full
        found = [at for at in (full.find(s, searched_from) for s in self.stop) if at != -1]
        if found:  # the text ends before the earliest stop string
            self.text = full[: min(found)]
            self.stopped = True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """What was held back, at the end of the row."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.sent:
            return ""
        piece = self.text[self.sent : end]
        self.sent = end
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
