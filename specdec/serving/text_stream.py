"""A generation's text as it streams: decoded incrementally, whole characters only, cut before the
first stop string."""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest of ``stops`` begins in ``text`` (None: none occurs)."""
    starts = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(starts) if starts else None


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops`` without completing it
    (text that more tokens could turn into a stop string)."""
    return max((k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)


class StreamedText:
    """The text of a generation, decoded a few tokens at a time.

    Each `update` decodes only a short window: the tokens of the previous piece as context (so a
    tokenizer that drops or adds a leading space at the start of a decode sees the same
    neighbours as in the whole text) and the new ones, and appends what the new ones add. A piece
    that ends in an incomplete multi-byte character (U+FFFD) waits for the next tokens.

    ``text`` is everything decoded so far, cut before the first stop string; `update` returns the
    part that is safe to show: never the beginning of a possible stop string. `rest` returns what
    is left once generation has ended.

    Args:
        tokenizer: decodes the generated ids (special tokens skipped).
        stops: stop strings (OpenAI semantics: the text ends before the first one, which is not
            included, and generation ends there).
    """

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.text = ""
        self.stopped = False
        self._decoded = ""  # the whole text decoded so far (before any stop cut)
        self._prefix = 0  # tokens[_prefix:_read] are the context of the next decode
        self._read = 0  # tokens decoded into ``_decoded``
        self._shown = 0

    def update(self, tokens: list[int], final: bool = False) -> str:
        """Decode the new part of ``tokens`` (every token generated so far); return the newly
        showable text. ``final``: generation has ended, so an incomplete character is kept as is."""
        if self.stopped:
            return ""
        decode = self.tokenizer.decode
        context = decode(tokens[self._prefix : self._read], skip_special_tokens=True)
        window = decode(tokens[self._prefix :], skip_special_tokens=True)
        if len(window) > len(context) and (final or not window.endswith("\ufffd")):
            self._decoded += window[len(context) :]
            self._prefix, self._read = self._read, len(tokens)
        end = first_stop(self._decoded, self.stops)
        if end is not None:
            self.stopped = True
            self.text = self._decoded[:end]
            return self._show(end)
        self.text = self._decoded
        return self._show(len(self.text) - stop_prefix_len(self.text, self.stops))

    def rest(self) -> str:
        """The text not shown yet, once generation has ended."""
        return self._show(len(self.text))

    @property
    def shown(self) -> int:
        """Characters of ``text`` returned so far."""
        return self._shown

    def _show(self, end: int) -> str:
        if end <= self._shown:
            return ""
        piece, self._shown = self.text[self._shown : end], end
        return piece
