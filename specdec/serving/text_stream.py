"""A generation's text as it streams: whole characters only, cut before the first stop string."""

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
    """The text of a generation, decoded from all its tokens after each step.

    ``text`` is everything decoded so far, cut before the first stop string; `update` returns the
    part that is safe to show: never a trailing incomplete character (U+FFFD while a multi-byte
    character is still arriving) and never the beginning of a possible stop string. `rest` returns
    what is left once generation has ended.

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
        self._shown = 0

    def update(self, tokens: list[int]) -> str:
        """Decode ``tokens`` (every token generated so far); return the newly showable text."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        end = first_stop(text, self.stops)
        self.stopped = end is not None
        if self.stopped:
            self.text = text[:end]
            return self._show(end)
        self.text = text
        whole = text.rstrip("\ufffd")
        return self._show(len(whole) - stop_prefix_len(whole, self.stops))

    def rest(self) -> str:
        """The text not shown yet, once generation has ended."""
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        if end <= self._shown:
            return ""
        piece, self._shown = self.text[self._shown : end], end
        return piece
