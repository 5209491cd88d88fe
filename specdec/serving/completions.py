"""From a validated OpenAI request to a generation on the served decoder's engine, and back to text.

The event loop only routes: the chat template, tokenisation, argument preparation and every
detokenisation run on worker threads (short, non-blocking work, so no request waits on another's
and none on the pool's size); the model runs on the engine's own loop, which the request reaches
through `SpeculativeDecoder.submit` and leaves through its `Stream`, read asynchronously.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import anyio.to_thread
import torch

from specdec.api.arguments import prepare_request
from specdec.constrain import Constraint, ConstraintError
from specdec.models.prompts import encode_chat
from specdec.serving.limits import ServerLimits
from specdec.serving.logprobs import LogprobText
from specdec.serving.openai_api import APIError, ChatCompletionRequest, SamplingRequest
from specdec.serving.text_stream import StreamedText
from specdec.step.request import DecodeRequest
from specdec.step.stream import Overloaded, Stream

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


@dataclass
class Generation:
    """One request's generation: its stream, its text so far, and how it ended."""

    id: str
    created: int
    request: DecodeRequest
    stream: Stream
    output: StreamedText
    prompt_tokens: int
    logprob_text: LogprobText | None = None  # set when the request asked for log-probabilities
    finish_reason: str | None = None
    tokens_read: int = 0  # tokens the text so far was decoded from
    logprobs_sent: int = 0  # tokens whose log-probabilities a response or chunk carried
    text_offset: int = 0  # characters of those tokens (completions' ``text_offset``)

    def logprobs(self, chat: bool, final: bool, streamed: bool) -> dict | None:
        """The log-probabilities not sent yet, in the endpoint's shape (None when not asked for, or
        when a stream chunk has none to carry). They cover the tokens read so far (the engine
        records a token's log-probability before it hands the token over), cut where a stop string
        cut the text; the end-of-sequence token gets none."""
        if self.logprob_text is None:
            return None
        tokens = list(self.stream.tokens[: self.tokens_read])
        kept = len(tokens)
        if self.output.stops:  # only text that is shown: never past a stop string
            shown = self.output.text if final else self.output.text[: self.output.shown]
            kept = self.logprob_text.tokens_within(tokens, len(shown))
        while kept and tokens[kept - 1] in self.request.eos_ids:
            kept -= 1
        new = self.stream.result.logprobs[self.logprobs_sent : max(kept, self.logprobs_sent)]
        self.logprobs_sent += len(new)
        if not new and streamed:
            return None
        if chat:
            return {"content": self.logprob_text.chat(new), "refusal": None}
        shape, self.text_offset = self.logprob_text.completion(new, self.text_offset)
        return shape

    def usage(self) -> dict:
        """OpenAI's ``usage`` counts."""
        completion = len(self.stream.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def spec_stats(self) -> dict:
        """specdec's own figures for the generation (a response's ``specdec`` field): verify steps,
        draft tokens proposed and kept (every step also commits one token of the target's own), mean
        accepted tokens per step."""
        stats = self.stream.result.stats
        return {"steps": stats.steps, "new_tokens": stats.new_tokens, "drafted_tokens": stats.drafted_tokens,
                "accepted_tokens": stats.new_tokens - stats.steps,
                "mean_accepted_tokens": stats.mean_accepted_tokens, "prefill_seconds": stats.prefill_seconds,
                "decode_seconds": stats.decode_seconds}


def _busy(running: int, queued: int) -> APIError:
    """429 with ``Retry-After``: the engine's queue is full."""
    decoder_busy = f"the server is busy ({running} requests running, {queued} queued): retry later"
    return APIError(429, decoder_busy, code="rate_limit_exceeded", error_type="rate_limit_error",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class Completions:
    """Turns validated requests into generations on the served decoder.

    Args:
        served: the `specdec.serving.server.Served` holder of the decoder (None while loading).
        model_name: the only model name requests may ask for.
        max_tokens_limit: the most tokens one request may generate.
        limits: the per-request `ServerLimits`.
    """

    def __init__(self, served, model_name: str, max_tokens_limit: int, limits: ServerLimits) -> None:
        self.served = served
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.limits = limits

    def check_model(self, body: SamplingRequest) -> None:
        """A request must name the served model."""
        if body.model != self.model_name:
            raise APIError(404, f"The model {body.model!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def start(self, body: SamplingRequest, id_prefix: str) -> Generation:
        """Prepare ``body`` off the event loop and submit it to the engine (429 with ``Retry-After``
        when its queue is full); nothing of the model has run when this returns."""
        arrived = time.monotonic()
        decoder = self.served.ready()
        if not decoder.loop.room:  # refused at once, before templating and tokenising
            self.served.refused["queue_full"] += 1
            raise _busy(decoder.running, decoder.queued)
        request, prompt_len, logprob_text = await anyio.to_thread.run_sync(self._prepare, decoder, body)
        request.timeout = max(self.limits.request_timeout - (time.monotonic() - arrived), 0.0)
        try:
            stream = decoder.submit(request)
        except Overloaded as full:  # filled up while this one was prepared
            raise _busy(full.running, full.queued) from None
        return Generation(id=f"{id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), request=request,
                          stream=stream, output=StreamedText(decoder.tokenizer, body.stop_strings),
                          prompt_tokens=prompt_len, logprob_text=logprob_text)

    # ------------------------------------------------------------------ on a worker thread
    def _prepare(self, decoder, body: SamplingRequest) -> tuple[DecodeRequest, int, LogprobText | None]:
        """The generation's `DecodeRequest`, the prompt's length and (when log-probabilities are asked
        for) their text view, every limit checked (400 naming the field)."""
        if isinstance(body, ChatCompletionRequest):
            if len(body.messages) > self.limits.max_messages:
                raise APIError(400, f"messages holds {len(body.messages)} messages, above this server's limit of "
                                    f"{self.limits.max_messages}", param="messages")
            try:
                prompt = encode_chat(decoder.tokenizer, [m.model_dump() for m in body.messages])[0].tolist()
            except ValueError as err:
                raise APIError(400, str(err), param="messages") from None
            field = "messages"
        else:
            prompt = list(decoder.tokenizer(body.prompt)["input_ids"])
            if not prompt:
                raise APIError(400, "prompt is empty: it must encode to at least one token", param="prompt")
            field = "prompt"
        if len(prompt) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(prompt)} tokens long, above this server's limit of "
                                f"{self.limits.max_prompt_tokens}", param=field)
        gen_kwargs = {"max_new_tokens": self._max_new_tokens(decoder, body, len(prompt), field)}
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature == 0:
            gen_kwargs["do_sample"] = False
        else:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p)
            if decoder.model.generation_config.top_k is None:  # OpenAI samples with no top-k cut;
                gen_kwargs["top_k"] = 0  # transformers' default would keep 50 (a model's own top_k stays)
        try:
            if body.response_format is not None:
                gen_kwargs["constraint"] = Constraint.from_response_format(body.response_format)
            request, _ = prepare_request(decoder, torch.tensor(prompt, dtype=torch.long), None, None, None, None,
                                         None, body.seed, decoder.tokenizer, gen_kwargs)
        except ConstraintError as err:  # the schema, or the grammar with this model's tokenizer
            raise APIError(400, f"response_format is not usable: {err.reason}", param="response_format") from None
        except (ValueError, TypeError) as err:
            raise APIError(400, str(err)) from None
        request.logprobs = body.logprobs_count
        logprob_text = None if request.logprobs is None else LogprobText(decoder.tokenizer, decoder.logits_size)
        return request, len(prompt), logprob_text

    def _max_new_tokens(self, decoder, body: SamplingRequest, prompt_len: int, prompt_field: str) -> int:
        """The request's length limit (this server's limit when unset), checked against the limit and
        against the model's context."""
        name, asked = body.max_tokens_field
        if asked is not None and asked > self.max_tokens_limit:
            raise APIError(400, f"{name} is {asked}, above this server's limit of {self.max_tokens_limit} tokens "
                                "(--max-tokens-limit)", param=name)
        wanted = self.max_tokens_limit if asked is None else asked
        context = decoder.context_length
        if context is None or prompt_len + wanted <= context:
            return wanted
        if prompt_len >= context:
            raise APIError(400, f"the prompt ({prompt_len} tokens) fills the model's context of {context} tokens",
                           param=prompt_field)
        if asked is None:
            return context - prompt_len
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus {name} ({wanted}) exceeds the model's context "
                            f"of {context} tokens", param=name)

    # ------------------------------------------------------------------ reading the generation
    async def deltas(self, generation: Generation) -> AsyncIterator[str]:
        """The generation's text as it becomes showable, step by step; then sets ``finish_reason``.

        Ends at EOS, a stop string or the length limit. However the iteration ends (finished,
        failed, or closed by a client that went away), the generation is cancelled if it still
        runs: the engine frees its row at its next step.
        """
        stream, output = generation.stream, generation.output
        try:
            async for _ in stream:
                tokens = list(stream.tokens)
                piece = await anyio.to_thread.run_sync(output.update, tokens)
                generation.tokens_read = len(tokens)
                if piece:
                    yield piece
                if output.stopped:
                    break
        finally:
            stream.close()
        generation.tokens_read = len(stream.tokens)
        piece = await anyio.to_thread.run_sync(lambda: output.update(list(stream.tokens), final=True))
        tokens, request = stream.tokens, generation.request
        ended = output.stopped or len(tokens) < request.max_new_tokens or tokens[-1] in request.eos_ids
        generation.finish_reason = "stop" if ended else "length"
        piece += output.rest()
        if piece:
            yield piece

    async def complete(self, generation: Generation, connection) -> None:
        """Run a non-streamed generation to its end, cancelling it if ``connection`` (the request's
        ASGI ``receive``) reports that the client went away."""

        async def cancel_on_disconnect() -> None:
            while (await connection())["type"] != "http.disconnect":
                pass
            generation.stream.cancel()

        failure = None
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_on_disconnect)
            try:
                async for _ in self.deltas(generation):
                    pass
            except Exception as err:  # raised outside the group, so no exception group wraps it
                failure = err
            finally:
                group.cancel_scope.cancel()
        if failure is not None:
            raise failure
