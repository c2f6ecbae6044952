"""Turning one row's tokens into text as they come: new text per step, stop strings cut out,
and text that could still become a stop string (or an incomplete UTF-8 character) held back."""

from __future__ import annotations

# What a tokenizer's decode shows for bytes that do not yet form a whole character.
_INCOMPLETE = "\ufffd"


class TextStream:
    """The text of one request's completion so far. ``add`` takes the next token and returns the
    text that can be shown now; ``stopped`` is set once a stop string appeared (the text ends
    before it, as OpenAI's API returns it)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (up to a stop string, if one appeared)
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith(_INCOMPLETE):
            return ""  # the next token completes the character
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text = full
        for s in self.stop:
            at = full.find(s, searched_from)
            if at != -1:
                self.text = full[:at]
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
