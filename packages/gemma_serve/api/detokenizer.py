"""Streaming detokenization that only ever emits complete UTF-8 text.

Decoding one token at a time is wrong for SentencePiece tokenizers: a byte-fallback token can be
half of a character, and a word-initial "▁" only becomes a space in context. So each step decodes a
short window of tokens twice, without and with the new tokens, and emits the difference once it no
longer ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window (left context)
        self._read_offset = 0  # tokens before this have been emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip)

    def _delta(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now complete (may be "")."""
        self._ids.extend(token_ids)
        delta = self._delta()
        if not delta or delta.endswith(REPLACEMENT):
            return ""  # nothing visible yet, or half of a multi-byte character: wait for more
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta

    def flush(self) -> str:
        """At the end of the stream: what is left, with an incomplete trailing character dropped."""
        delta = self._delta().rstrip(REPLACEMENT)
        self._prefix_offset = self._read_offset = len(self._ids)
        return delta
