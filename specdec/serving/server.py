"""`specdec serve`: an OpenAI-compatible HTTP API over one `SpeculativeDecoder` (FastAPI).

Every request generates through the decoder's shared `specdec.batch.batcher.Batcher`, one step
at a time on a worker thread, so concurrent requests are verified together in batched forwards and
the event loop stays free. A stream whose client goes away is closed at once: its generation is
cancelled and its sequence freed. Every error, bad requests included, is answered in OpenAI's error shape; none ends the
server.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import anyio.to_thread
import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from specdec.api.arguments import prepare_request
from specdec.batch.batcher import batcher_for
from specdec.models.prompts import encode_chat
from specdec.serving.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    error_body,
)
from specdec.serving.text_stream import StreamedText
from specdec.step.request import DecodeRequest, DecodeResult, SpecStats
from specdec.step.support import UnsupportedGeneration

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Generation:
    """One request's generation: what it asked for, what it made so far, and how it ended."""

    id: str
    created: int
    request: DecodeRequest
    result: DecodeResult
    output: StreamedText
    prompt_tokens: int
    finish_reason: str | None = None

    def usage(self) -> dict:
        """OpenAI's ``usage`` counts."""
        completion = len(self.result.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def spec_stats(self) -> dict:
        """specdec's own figures for the generation (a response's ``specdec`` field): verify steps,
        draft tokens proposed and kept (every step also commits one token of the target's own), mean
        accepted tokens per step."""
        stats = self.result.stats
        return {"steps": stats.steps, "new_tokens": stats.new_tokens, "drafted_tokens": stats.drafted_tokens,
                "accepted_tokens": stats.new_tokens - stats.steps,
                "mean_accepted_tokens": stats.mean_accepted_tokens, "prefill_seconds": stats.prefill_seconds,
                "decode_seconds": stats.decode_seconds}


class Completions:
    """Turns validated requests into generations on the shared batcher, and counts the running ones.

    Args:
        decoder: the `SpeculativeDecoder` (with a tokenizer) that generates.
        model_name: the only model name requests may ask for.
        max_tokens_limit: the most tokens one request may generate.
    """

    def __init__(self, decoder, model_name: str, max_tokens_limit: int) -> None:
        self.decoder = decoder
        self.tokenizer = decoder.tokenizer
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.batcher = batcher_for(decoder)  # shared with the decoder's other users (sessions, ...)
        self.active_requests = 0

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The prompt ids of a conversation, through the tokenizer's chat template."""
        try:
            return encode_chat(self.tokenizer, [m.model_dump() for m in body.messages])[0].tolist()
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None

    def text_prompt(self, body: CompletionRequest) -> list[int]:
        """The prompt ids of a plain completion."""
        ids = list(self.tokenizer(body.prompt)["input_ids"])
        if not ids:
            raise APIError(400, "prompt is empty: it must encode to at least one token", param="prompt")
        return ids

    def check_model(self, body: SamplingRequest) -> None:
        """A request must name the served model."""
        if body.model != self.model_name:
            raise APIError(404, f"The model {body.model!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def start(self, body: SamplingRequest, prompt: list[int], id_prefix: str) -> Generation:
        """Validate the request against this server and model and build its generation (no model work yet).

        ``temperature=0`` decodes greedily; otherwise it samples at ``temperature`` and ``top_p``
        (OpenAI's defaults, 1 and 1, when unset) with ``seed`` as the sampling key."""
        gen_kwargs = {"max_new_tokens": self._max_new_tokens(body, len(prompt))}
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature == 0:
            gen_kwargs["do_sample"] = False
        else:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p)
            if self.decoder.model.generation_config.top_k is None:  # OpenAI samples with no top-k cut;
                gen_kwargs["top_k"] = 0  # transformers' default would keep 50 (a model's own top_k stays)
        try:
            request, _ = prepare_request(self.decoder, torch.tensor(prompt, dtype=torch.long), None, None, None, None,
                                         None, body.seed, self.tokenizer, gen_kwargs)
        except (ValueError, TypeError) as err:
            raise APIError(400, str(err)) from None
        return Generation(id=f"{id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), request=request,
                          result=DecodeResult(tokens=[], stats=SpecStats()),
                          output=StreamedText(self.tokenizer, body.stop_strings), prompt_tokens=len(prompt))

    def _max_new_tokens(self, body: SamplingRequest, prompt_len: int) -> int:
        """The request's length limit (this server's limit when unset), checked against the limit and
        against the model's learned positions (if it has a fixed number)."""
        name, asked = body.max_tokens_field
        if asked is not None and asked > self.max_tokens_limit:
            raise APIError(400, f"{name} is {asked}, above this server's limit of {self.max_tokens_limit} tokens "
                                "(--max-tokens-limit)", param=name)
        wanted = self.max_tokens_limit if asked is None else asked
        positions = self.decoder.position_limit
        if positions is None or prompt_len + wanted <= positions:
            return wanted
        if asked is None and prompt_len < positions:
            return positions - prompt_len
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus {name} ({wanted}) exceeds the model's "
                            f"{positions} positions", param=name)

    async def deltas(self, generation: Generation) -> AsyncIterator[str]:
        """Run ``generation`` step by step on worker threads, yielding the text as it becomes showable.

        Ends at EOS, a stop string or the length limit, then sets ``finish_reason``. Whenever the
        iteration ends (finished, failed, or closed or cancelled by a client that went away), the
        generation is closed, which frees its sequence, before this returns.
        """
        steps = self.batcher.decode_steps(generation.request, generation.result)
        self.active_requests += 1
        try:
            while not generation.output.stopped:
                if await anyio.to_thread.run_sync(next, steps, None) is None:
                    break
                piece = generation.output.update(generation.result.tokens)
                if piece:
                    yield piece
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(steps.close)  # may wait for the step another thread runs
            self.active_requests -= 1
        tokens, request = generation.result.tokens, generation.request
        ended = generation.output.stopped or len(tokens) < request.max_new_tokens or tokens[-1] in request.eos_ids
        generation.finish_reason = "stop" if ended else "length"
        piece = generation.output.rest()
        if piece:
            yield piece


class EventStream(StreamingResponse):
    """A server-sent event stream that closes its event iterator however the response ends:
    starlette cancels a stream whose client disconnects wherever it waits, possibly while the
    iterator is suspended between events, which would otherwise leave it to the garbage collector."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def collect(deltas: AsyncIterator[str]) -> None:
    """Run a generation to its end (its text is then in ``Generation.output.text``)."""
    async for _ in deltas:
        pass


async def stream_events(generation: Generation, deltas: AsyncIterator[str], model_name: str, chat: bool,
                        include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks for a streamed generation: (chat: a first delta with the role), a chunk per
    text delta, a last chunk with ``finish_reason`` (and specdec's figures), the usage chunk when
    asked, then ``[DONE]``. A failure mid-stream ends it with an error event."""
    base = {"id": generation.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": generation.created, "model": model_name}
    if include_usage:
        base["usage"] = None

    def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        return base | {"choices": [choice | {"logprobs": None, "finish_reason": finish_reason}]}

    try:
        if chat:
            yield sse(chunk("", role=True))
        async for piece in deltas:
            yield sse(chunk(piece))
    except Exception as err:
        logger.exception("generation %s failed", generation.id)
        yield sse(error_body(f"the generation failed: {type(err).__name__}: {err}", "server_error"))
        return
    finally:
        await deltas.aclose()
    yield sse(chunk(None, generation.finish_reason) | {"specdec": generation.spec_stats()})
    if include_usage:
        yield sse(base | {"choices": [], "usage": generation.usage()})
    yield "data: [DONE]\n\n"


def require_api_key(api_key: str):
    """A dependency that refuses (401) requests without ``Authorization: Bearer <api_key>``."""
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not secrets.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    return check


def server_error(err: Exception) -> JSONResponse:
    """A 500 in OpenAI's error shape, naming the exception (never its traceback)."""
    return JSONResponse(error_body(f"the server failed: {type(err).__name__}: {err}", "server_error"),
                        status_code=500)


class GuardedRoute(APIRoute):
    """A route that answers an unexpected failure itself, with a logged 500 in OpenAI's error shape:
    starlette's catch-all handler would answer it too, but then close the client's connection."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, RequestValidationError, HTTPException):
                raise
            except Exception as err:
                logger.exception("%s %s failed", request.method, request.url.path)
                return server_error(err)

        return guarded


def add_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's error shape: refused requests, invalid bodies (400),
    unknown routes and methods, and anything unexpected outside a `GuardedRoute` (500; starlette
    logs its traceback)."""

    async def refused(_request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(problem["type"] == "json_invalid" for problem in problems):
            return JSONResponse(error_body("We could not parse the JSON body of your request: send valid JSON "
                                           "(Content-Type: application/json)"), status_code=400)
        fields = [".".join(str(part) for part in problem["loc"] if part != "body") for problem in problems]
        message = "; ".join(f"{field or 'body'}: {problem['msg']}" for field, problem in zip(fields, problems))
        return JSONResponse(error_body(message, param=fields[0] or None), status_code=400)

    async def http_error(_request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code, headers=err.headers)

    async def failed(_request: Request, err: Exception) -> JSONResponse:  # starlette logs the traceback
        return server_error(err)

    app.add_exception_handler(APIError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, failed)


def build_app(decoder, model_name: str, api_key: str | None = None, max_tokens_limit: int = 2048) -> FastAPI:
    """The OpenAI-compatible app over ``decoder``.

    Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
    ``GET /v1/models`` and ``GET /health`` (``{"status", "model", "active_requests"}``, no key
    needed). Responses carry OpenAI's fields plus ``specdec`` (the generation's `SpecStats` figures).

    Args:
        decoder: a `specdec.SpeculativeDecoder` built with a tokenizer.
        model_name: the name clients must ask for (``model``), listed by ``/v1/models``.
        api_key: when set, ``/v1`` requests need ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_tokens_limit: the largest ``max_tokens`` accepted (400 above), and the length of a
            request that sets none.
    """
    if decoder.tokenizer is None:
        raise ValueError("decoder has no tokenizer: build it as SpeculativeDecoder(model, tokenizer)")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("model_name must be a non-empty string")
    if api_key is not None and not api_key:
        raise ValueError("api_key is empty: pass None to serve without a key")
    if isinstance(max_tokens_limit, bool) or not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be an int >= 1, got {max_tokens_limit!r}")
    if decoder.unsupported:
        raise UnsupportedGeneration(decoder.unsupported)
    completions = Completions(decoder, model_name, max_tokens_limit)
    started = int(time.time())
    app = FastAPI(title="specdec", summary=f"OpenAI-compatible API serving {model_name}")
    app.state.completions = completions
    add_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key(api_key))] if api_key else [],
                   route_class=GuardedRoute)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        completions.check_model(body)
        generation = completions.start(body, completions.chat_prompt(body), "chatcmpl")
        deltas = completions.deltas(generation)
        if body.stream:
            return EventStream(stream_events(generation, deltas, model_name, True, body.include_usage))
        await collect(deltas)
        return {"id": generation.id, "object": "chat.completion", "created": generation.created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.output.text},
                             "logprobs": None, "finish_reason": generation.finish_reason}],
                "usage": generation.usage(), "specdec": generation.spec_stats()}

    @v1.post("/completions")
    async def text_completions(body: CompletionRequest):
        completions.check_model(body)
        generation = completions.start(body, completions.text_prompt(body), "cmpl")
        deltas = completions.deltas(generation)
        if body.stream:
            return EventStream(stream_events(generation, deltas, model_name, False, body.include_usage))
        await collect(deltas)
        return {"id": generation.id, "object": "text_completion", "created": generation.created, "model": model_name,
                "choices": [{"index": 0, "text": generation.output.text, "logprobs": None,
                             "finish_reason": generation.finish_reason}],
                "usage": generation.usage(), "specdec": generation.spec_stats()}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "specdec"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active_requests": completions.active_requests}

    app.include_router(v1)
    return app
