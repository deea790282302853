"""Stop strings are matched on text, after detokenization: a stop string can span tokens.

Text that could be the beginning of a stop string is held back until it is known not to be one, so
the caller never sees part of a stop string. The stop string itself is not returned.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopResult:
    text: str  # safe to emit now
    stopped: bool  # a stop string matched; `text` ends right before it


class StopStringMatcher:
    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._held = ""

    def push(self, text: str) -> StopResult:
        if not self._stop:
            return StopResult(text, False)
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            return StopResult(buffer[: min(hits)], True)
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return StopResult(buffer[: len(buffer) - keep], False)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:n]):
                    best = n
                    break
        return best
