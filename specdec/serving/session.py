"""Chat sessions: multi-turn conversations over a `SpeculativeDecoder`, streaming, KV reuse across
turns, and drafter state that keeps learning from every conversation."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from specdec.api.arguments import prepare_request
from specdec.api.decoder import SpeculativeDecoder
from specdec.models.prompts import encode_chat
from specdec.serving.text_stream import StreamedText
from specdec.step.request import DecodeRequest, KVState, SpecStats

SESSION_FORMAT = 1


class ChatSession:
    """One conversation with the decoder's model, using the tokenizer's chat template.

    Each turn re-templates the whole history, but only the tokens after the longest prefix already
    in the conversation's KV cache are prefilled (a template that re-tokenizes an earlier answer
    differently just reuses less). Drafter state (the recycling matrix, the n-gram store) and the
    scheduler's statistics are shared by every session of the decoder, so each conversation
    speeds up the next; ``own_drafter=True`` gives this session a private drafter instead.
    Sessions may run on several threads: concurrent turns of one decoder's sessions are verified
    together in the decoder's engine loop (several sequences per forward), and every session's
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
        self._turn_lock = threading.Lock()  # held from a turn's start to its stream's end or close
        self._last_turn = None  # the last turn's `specdec.step.stream.Stream`

    @property
    def tokenizer(self):
        return self.decoder.tokenizer

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages, system prompt first."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.history

    def send(self, message: str, on_text: Callable[[str], None] | None = None, **gen_kwargs) -> str:
        """Add a user message and return the whole answer (``model.generate`` keyword arguments
        apply). ``on_text`` receives the answer's text as it is accepted, whole characters only.
        The engine's steps run on the calling thread when nothing else drives it (`SpeculativeDecoder.run`)."""
        request = self._begin(message, gen_kwargs)
        output = StreamedText(self.tokenizer)
        tokens: list[int] = []

        def on_tokens(new: list[int]) -> None:
            tokens.extend(new)
            piece = output.update(tokens)
            if piece and on_text is not None:
                on_text(piece)

        stats = None  # stays None if the request was refused before it ran
        try:
            stream = self.decoder.run(request, on_tokens)
            stats = stream.result.stats
            stream.wait()  # a failure raises here
        finally:
            if stats is None and tokens:  # interrupted while it ran: the partial answer is still a turn
                stats = SpecStats(new_tokens=len(tokens))
            self._end_turn(tokens, stats)
        piece = output.update(tokens, final=True) + output.rest()
        if piece and on_text is not None:
            on_text(piece)
        return output.text

    def stream(self, message: str, **gen_kwargs) -> Iterator[str]:
        """Add a user message and yield the answer's text as tokens are accepted.

        Text is only yielded once it decodes to whole characters. Closing the iterator early
        stops generation at the engine's next step boundary; the partial answer (what was read)
        stays in the history. The stream holds no lock the engine needs: it may be read and
        closed from any thread, and one that is abandoned is cancelled when garbage-collected.
        One turn at a time per session: a second message while a stream is still open raises
        RuntimeError.
        """
        request = self._begin(message, gen_kwargs)
        try:
            stream = self._last_turn = self.decoder.submit(request)  # concurrent sessions share forwards
        except BaseException:
            self._end_turn([], None)
            raise
        output = StreamedText(self.tokenizer)
        try:
            for _ in stream:
                piece = output.update(stream.tokens)
                if piece:
                    yield piece
            piece = output.update(stream.tokens, final=True) + output.rest()
            if piece:
                yield piece
        finally:
            stream.close()  # never waits: this may run when an abandoned stream is collected
            self._end_turn(stream.tokens, stream.result.stats)

    def _begin(self, message: str, gen_kwargs: dict) -> DecodeRequest:
        """Take the session's turn and build its request (the whole history through the template)."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message is empty")
        if not self._turn_lock.acquire(blocking=False):  # a plain Lock: any thread may release it
            raise RuntimeError("this ChatSession is still answering: read its stream to the end or close() it "
                               "before the next message")
        try:
            self.wait()  # a closed turn ends at the engine's next step: its KV state is then written
            prompt = encode_chat(self.tokenizer, self.messages() + [{"role": "user", "content": message}])
            gen_kwargs.setdefault("max_new_tokens", 256)
            request, _ = prepare_request(self.decoder, prompt, gen_kwargs.pop("generation_config", None),
                                         gen_kwargs.pop("logits_processor", None),
                                         gen_kwargs.pop("stopping_criteria", None), None,
                                         gen_kwargs.pop("tree_budget", None), gen_kwargs.pop("generator", None),
                                         self.tokenizer, gen_kwargs)
        except BaseException:
            self._turn_lock.release()
            raise
        request.kv = self._kv
        self.history.append({"role": "user", "content": message})
        return request

    def _end_turn(self, tokens: list[int], stats: SpecStats | None) -> None:
        """Record the answer (what was read of it) and give the turn back."""
        if stats is None:  # refused before it ran: the message is not part of the conversation
            self.history.pop()
        else:
            self.history.append({"role": "assistant",
                                 "content": self.tokenizer.decode(tokens, skip_special_tokens=True)})
            self.last_stats = stats
        self._turn_lock.release()

    def wait(self) -> None:
        """Block until the last turn's generation has ended in the engine: after a stream was
        closed early, its row is freed and the conversation's KV state written at the engine's
        next step boundary."""
        if self._last_turn is not None:
            self._last_turn.wait_ended()

    def reset(self) -> None:
        """Forget the conversation (and its KV cache); learned drafter state is kept."""
        self.wait()
        self.history = []
        self._kv.clear()

    def save(self, path) -> None:
        """Write the conversation (and a private drafter's state) to ``path``."""
        state = {"kind": "specdec-chat-session", "format": SESSION_FORMAT, "system_prompt": self.system_prompt,
                 "history": self.history, "own_drafter": self.own_drafter,
                 "decoder_state": self.decoder.state_dict() if self.own_drafter else None}
        torch.save(state, Path(path))

    @classmethod
    def load(cls, path, decoder: SpeculativeDecoder) -> "ChatSession":
        """A session saved by `save`, continued on ``decoder`` (its KV cache is rebuilt on the next turn).

        The file is validated before anything changes: `drafters.state.StateError` (a
        ``ValueError``) for a truncated file, a file of another kind or malformed fields."""
        from drafters.state import StateError, field, int_field, read_state_file

        state = read_state_file(path, "specdec-chat-session")
        where = f"chat session {path}"
        if int_field(state, "format", where) != SESSION_FORMAT:
            raise StateError(f"{where}: format {state['format']} is not {SESSION_FORMAT}, the one this version reads")
        system_prompt = field(state, "system_prompt", where)
        if system_prompt is not None and (not isinstance(system_prompt, str) or not system_prompt.strip()):
            raise StateError(f"{where}: system_prompt must be None or a non-empty string")
        history = field(state, "history", where)
        if not isinstance(history, list) or not all(
                isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("user", "assistant")
                and isinstance(m["content"], str) for m in history):
            raise StateError(f"{where}: history must be a list of {{'role': 'user'|'assistant', 'content': str}}")
        own_drafter = field(state, "own_drafter", where)
        if not isinstance(own_drafter, bool):
            raise StateError(f"{where}: own_drafter must be True or False")
        decoder_state = field(state, "decoder_state", where)
        if own_drafter != (decoder_state is not None):
            raise StateError(f"{where}: decoder_state must be present exactly when own_drafter is True")
        session = cls(decoder, system_prompt, own_drafter=own_drafter)
        if decoder_state is not None:
            session.decoder.load_state_dict(decoder_state)
        session.history = copy.deepcopy(history)
        return session
