"""Log-probabilities as the OpenAI API writes them: the completions API's `logprobs` object
(tokens, token_logprobs, top_logprobs, text_offset) and the chat API's `logprobs.content`
(token, logprob, bytes, top_logprobs), from the engines' TokenLogprob entries."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from edit_serve.engines.base import TokenLogprob

#: what a log-probability of -inf is reported as
LOWEST_LOGPROB = -9999.0


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's characters (GPT-2, Llama 3, SmolLM2) and the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Pieces:
    """Each token's text and exact bytes (a byte-level token may hold part of a character,
    which its decoded text shows as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._alphabet = _byte_level_alphabet()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            text = self.tokenizer.decode([token])
            raw = self.tokenizer.convert_ids_to_tokens(token) or ""
            data = text.encode("utf-8")
            if raw and all(c in self._alphabet for c in raw):
                exact = bytes(self._alphabet[c] for c in raw)
                if exact.decode("utf-8", errors="replace") == text:  # a byte-level token indeed
                    data = exact
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[token] = (text, list(data))
        return self._cache[token]

    def text(self, token: int) -> str:
        return self(token)[0]


def _value(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


class TextOffsets:
    """Where each next token starts in the text the tokens so far make, in characters. A
    byte-level token may end inside a character (its own text shows U+FFFD): that character
    is counted once, when the token that completes it comes, and a token that starts inside
    it starts where it does."""

    def __init__(self):
        self.chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, data: Sequence[int]) -> int:
        """The offset of a token of bytes `data`, which then count as text before the next."""
        at = self.chars
        self.chars += len(self._decoder.decode(bytes(data)))
        return at


def completion_logprobs(pieces: Pieces, ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offsets: TextOffsets | None = None) -> dict:
    """The completions API's `logprobs` object for tokens `ids` (`entries`: each one's, None
    where a token has none, as a prompt's first), their text offsets counted on from
    `offsets` (a stream's choice keeps one across its chunks; default: from 0)."""
    offsets = TextOffsets() if offsets is None else offsets
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(ids, entries):
        text, data = pieces(token)
        out["tokens"].append(text)
        out["text_offset"].append(offsets.take(data))
        out["token_logprobs"].append(None if entry is None else _value(entry.logprob))
        out["top_logprobs"].append(None if entry is None else {pieces.text(t): _value(v) for t, v in entry.top})
    return out


def chat_logprobs(pieces: Pieces, entries: Sequence[TokenLogprob]) -> list[dict]:
    """The chat API's `logprobs.content` for generated tokens."""
    def one(token: int, logprob: float) -> dict:
        text, data = pieces(token)
        return {"token": text, "logprob": _value(logprob), "bytes": data}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]
