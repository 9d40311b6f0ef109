"""Incremental detokenization with stop strings, one instance per generated sequence."""

from __future__ import annotations


class TextStream:
    """Turns generated token ids into text deltas.

    Decodes a sliding window (not the whole sequence each step), holds back a trailing
    incomplete UTF-8 character, and holds back any tail that could be the start of a stop
    string, so a stop string never reaches the client even when it spans several tokens.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # all decoded text so far (after a stop: cut before it)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, token_id: int) -> str:
        """Add one token; return the text that may be sent now (maybe empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop:
                window = max(0, start - max(len(s) for s in self.stop))
                hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.stopped = True
                    return self.flush()
        end = len(self.text) - (self._holdback() if self.stop else 0)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        if not self.stopped and self._read < len(self.ids):  # a trailing partial character
            self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
