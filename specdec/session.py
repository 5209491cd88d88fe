"""Chat sessions: multi-turn conversations over a `SpeculativeDecoder`, streaming, KV reuse across
turns, and drafter state that keeps learning from every conversation."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from specdec.engine import DecodeResult, KVState, SpeculativeDecoder, SpecStats
from specdec.generate import prepare_request
from specdec.prompts import encode_chat

SESSION_FORMAT = 1


class ChatSession:
    """One conversation with the decoder's model, using the tokenizer's chat template.

    Each turn re-templates the whole history, but only the tokens after the longest prefix already
    in the conversation's KV cache are prefilled (a template that re-tokenizes an earlier answer
    differently just reuses less). Drafter state (the recycling matrix, the n-gram store) and the
    scheduler's statistics are shared by every session of the decoder, so each conversation
    speeds up the next; ``own_drafter=True`` gives this session a private drafter instead.
    Sessions may run on several threads: generation holds the model's lock, and every session's
    output is what it would be alone (greedy: token for token).

    Args:
        decoder: the `SpeculativeDecoder` (with a tokenizer) that generates.
        system_prompt: optional system message at the start of the history.
        own_drafter: keep a private drafter (same kind, fresh state) instead of the shared one.
    """

    def __init__(self, decoder: SpeculativeDecoder, system_prompt: str | None = None, *,
                 own_drafter: bool = False) -> None:
        if decoder.tokenizer is None:
            raise ValueError("decoder has no tokenizer: build it as SpeculativeDecoder(model, tokenizer)")
        if system_prompt is not None and not system_prompt.strip():
            raise ValueError("system_prompt is empty")
        self.decoder = decoder.fork() if own_drafter else decoder
        self.own_drafter = own_drafter
        self.system_prompt = system_prompt
        self.history: list[dict[str, str]] = []
        self.last_stats: SpecStats | None = None
        self._kv = KVState()

    @property
    def tokenizer(self):
        return self.decoder.tokenizer

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages, system prompt first."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.history

    def send(self, message: str, **gen_kwargs) -> str:
        """Add a user message and return the whole answer (``model.generate`` keyword arguments apply)."""
        return "".join(self.stream(message, **gen_kwargs))

    def stream(self, message: str, **gen_kwargs) -> Iterator[str]:
        """Add a user message and yield the answer's text as tokens are accepted.

        Text is only yielded once it decodes to whole characters. Closing the iterator early
        stops generation after the current step; the partial answer stays in the history.
        """
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message is empty")
        prompt = encode_chat(self.tokenizer, self.messages() + [{"role": "user", "content": message}])
        gen_kwargs.setdefault("max_new_tokens", 256)
        request, _ = prepare_request(self.decoder, prompt, gen_kwargs.pop("generation_config", None),
                                     gen_kwargs.pop("logits_processor", None), gen_kwargs.pop("stopping_criteria", None),
                                     None, gen_kwargs.pop("tree_budget", None), gen_kwargs.pop("generator", None),
                                     self.tokenizer, gen_kwargs)
        request.kv = self._kv
        result = DecodeResult(tokens=[], stats=SpecStats())
        self.history.append({"role": "user", "content": message})
        shown = ""
        steps = self.decoder.decode_steps(request, result)
        try:
            for _ in steps:
                text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                if len(text) > len(shown):
                    yield text[len(shown):]
                    shown = text
            text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
            if len(text) > len(shown):
                yield text[len(shown):]
        finally:
            steps.close()
            self.history.append({"role": "assistant",
                                 "content": self.tokenizer.decode(result.tokens, skip_special_tokens=True)})
            self.last_stats = result.stats

    def reset(self) -> None:
        """Forget the conversation (and its KV cache); learned drafter state is kept."""
        self.history = []
        self._kv.clear()

    def save(self, path) -> None:
        """Write the conversation (and a private drafter's state) to ``path``."""
        state = {"format": SESSION_FORMAT, "system_prompt": self.system_prompt, "history": self.history,
                 "own_drafter": self.own_drafter,
                 "decoder_state": self.decoder.state_dict() if self.own_drafter else None}
        torch.save(state, Path(path))

    @classmethod
    def load(cls, path, decoder: SpeculativeDecoder) -> "ChatSession":
        """A session saved by `save`, continued on ``decoder`` (its KV cache is rebuilt on the next turn)."""
        state = torch.load(Path(path), weights_only=True)
        if state.get("format") != SESSION_FORMAT:
            raise ValueError(f"{path} is not a specdec chat session file")
        session = cls(decoder, state["system_prompt"], own_drafter=state["own_drafter"])
        session.history = copy.deepcopy(state["history"])
        if state["decoder_state"] is not None:
            session.decoder.load_state_dict(state["decoder_state"])
        return session
