"""Log-probabilities in OpenAI's shapes: chat's ``logprobs.content`` entries and completions'
``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` lists, from the engine's
`specdec.step.request.TokenLogprob` records. A token's ``bytes`` are its own UTF-8 bytes (a token
that holds part of a character has a partial sequence, and its ``token`` text shows U+FFFD)."""

from __future__ import annotations

import math

from specdec.constrain.matcher import grammar_tokenizer
from specdec.step.request import TokenLogprob

FLOOR = -9999.0  # JSON has no -inf: a token that processed scores rule out is reported at this log-probability


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


class LogprobText:
    """Turns token ids into the text and bytes OpenAI reports for them.

    Args:
        tokenizer: the model's HF tokenizer.
        vocab_size: rows of the model's logits.
    """

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.raw = grammar_tokenizer(tokenizer, vocab_size)

    def piece(self, token: int) -> tuple[str, list[int]]:
        """A token's text (U+FFFD for a partial character) and its UTF-8 bytes."""
        data = self.raw.decode_bytes([token])
        return data.decode("utf-8", errors="replace"), list(data)

    def chat(self, entries: list[TokenLogprob]) -> list[dict]:
        """Chat's ``logprobs.content`` items."""
        out = []
        for entry in entries:
            text, data = self.piece(entry.token)
            top = []
            for token, logprob in entry.top:
                top_text, top_data = self.piece(token)
                top.append({"token": top_text, "logprob": _finite(logprob), "bytes": top_data})
            out.append({"token": text, "logprob": _finite(entry.logprob), "bytes": data, "top_logprobs": top})
        return out

    def completion(self, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """Completions' ``logprobs`` object for ``entries``, whose text starts at character ``offset``
        (each token's offset counts the characters of the tokens before it), and the offset after them."""
        tokens, offsets, tops = [], [], []
        for entry in entries:
            text = self.piece(entry.token)[0]
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            tops.append({self.piece(token)[0]: _finite(logprob) for token, logprob in entry.top})
        return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries], "top_logprobs": tops,
                "text_offset": offsets}, offset

    def tokens_within(self, tokens: list[int], length: int) -> int:
        """How many leading ``tokens`` decode to at most ``length`` characters (those whose text a
        stop string did not cut off)."""
        low, high = 0, len(tokens)
        while low < high:
            mid = (low + high + 1) // 2
            if len(self.tokenizer.decode(tokens[:mid], skip_special_tokens=True)) <= length:
                low = mid
            else:
                high = mid - 1
        return low
