"""`specdec serve`: an OpenAI-compatible HTTP API over one `SpeculativeDecoder` (FastAPI).

Every request is submitted to the decoder's engine loop, which owns the model and verifies the
running requests together in batched forwards; handlers only await their request's stream, so no
request, however slow its client, holds a thread or blocks another. A full engine queue is refused
at once (429 with ``Retry-After``), as is every request while the model loads (503). A client that
goes away, streamed or not, queued or generating, cancels its generation at the engine's next step.
Every error, bad requests included, is answered in OpenAI's error shape, without internals; none
ends the server.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from specdec.serving.completions import Completions, Generation
from specdec.serving.limits import RequestGate, ServerLimits
from specdec.serving.metrics import registry_for
from specdec.serving.openai_api import APIError, ChatCompletionRequest, CompletionRequest, error_body
from specdec.step.stream import TimedOut
from specdec.step.support import UnsupportedGeneration

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LOADING_RETRY_SECONDS = 2


class Served:
    """The decoder a server serves: None while the model loads (`set` makes the server ready)."""

    def __init__(self) -> None:
        self.decoder = None
        self.refused = {"loading": 0, "queue_full": 0}  # the server's own (the engine counts its queue's too)

    def set(self, decoder) -> None:
        """Serve ``decoder`` (a `specdec.SpeculativeDecoder` with a tokenizer) from now on."""
        check_decoder(decoder)
        self.decoder = decoder

    def ready(self):
        """The decoder, or a 503 with ``Retry-After`` while the model is loading."""
        if self.decoder is None:
            self.refused["loading"] += 1
            raise APIError(503, "the model is still loading: retry shortly", code="model_loading",
                           error_type="service_unavailable", headers={"Retry-After": str(LOADING_RETRY_SECONDS)})
        return self.decoder


def check_decoder(decoder) -> None:
    if decoder.tokenizer is None:
        raise ValueError("decoder has no tokenizer: build it as SpeculativeDecoder(model, tokenizer)")
    if decoder.unsupported:
        raise UnsupportedGeneration(decoder.unsupported)


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


def _failure(generation: Generation, err: BaseException) -> tuple[int, dict]:
    """The status and OpenAI error body of a generation that did not finish (never its internals:
    the details go to the log)."""
    if isinstance(err, TimedOut):
        return 504, error_body("the request did not finish within this server's time limit (--request-timeout)",
                               "timeout_error", code="timeout")
    logger.error("generation %s failed", generation.id, exc_info=err)
    return 500, error_body(f"the generation failed (request {generation.id}); the server keeps serving",
                           "server_error")


async def stream_events(generation: Generation, deltas: AsyncIterator[str], model_name: str, chat: bool,
                        include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks for a streamed generation: (chat: a first delta with the role), a chunk per
    text delta, a last chunk with ``finish_reason`` (and specdec's figures), the usage chunk when
    asked, then ``[DONE]``. A failure mid-stream ends it with an error event."""
    base = {"id": generation.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": generation.created, "model": model_name}
    if include_usage:
        base["usage"] = None

    def chunk(text: str | None, finish_reason: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        return base | {"choices": [choice | {"logprobs": logprobs, "finish_reason": finish_reason}]}

    try:
        if chat:
            yield sse(chunk("", role=True))
        async for piece in deltas:
            logprobs = await anyio.to_thread.run_sync(generation.logprobs, chat, False, True)
            yield sse(chunk(piece, logprobs=logprobs))
    except Exception as err:
        yield sse(_failure(generation, err)[1])
        return
    finally:
        await deltas.aclose()
    logprobs = await anyio.to_thread.run_sync(generation.logprobs, chat, True, True)
    yield sse(chunk(None, generation.finish_reason, logprobs=logprobs) | {"specdec": generation.spec_stats()})
    if include_usage:
        yield sse(base | {"choices": [], "usage": generation.usage()})
    yield "data: [DONE]\n\n"


def server_error() -> JSONResponse:
    """A 500 in OpenAI's error shape, with no internals (the traceback goes to the log)."""
    return JSONResponse(error_body("the server failed on this request; it keeps serving", "server_error"),
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
            except Exception:
                logger.exception("%s %s failed", request.method, request.url.path)
                return server_error()

        return guarded


def add_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's error shape: refused requests, invalid bodies (400),
    unknown routes and methods, and anything unexpected outside a `GuardedRoute` (500; starlette
    logs its traceback)."""

    async def refused(_request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

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

    async def failed(_request: Request, _err: Exception) -> JSONResponse:  # starlette logs the traceback
        return server_error()

    app.add_exception_handler(APIError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, failed)


def build_app(decoder, model_name: str, api_key: str | None = None, max_tokens_limit: int = 2048,
              limits: ServerLimits | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``decoder``.

    Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
    ``GET /v1/models``, ``GET /health`` (``{"status", "model", "running", "queued"}``; 503 while the
    model loads) and ``GET /metrics`` (Prometheus; neither needs the key). Responses carry
    OpenAI's fields plus ``specdec`` (the generation's `SpecStats` figures). ``response_format``
    constrains a request's output and ``logprobs`` / ``top_logprobs`` return log-probabilities
    (taken from the model's raw logits), streamed or not, in batches with any other requests.

    Args:
        decoder: a `specdec.SpeculativeDecoder` built with a tokenizer, or None to answer 503 until
            ``app.state.served.set(decoder)`` (a model that is still loading).
        model_name: the name clients must ask for (``model``), listed by ``/v1/models``.
        api_key: when set, ``/v1`` requests need ``Authorization: Bearer <api_key>`` (401
            otherwise, before their body is read).
        max_tokens_limit: the largest ``max_tokens`` accepted (400 above), and the length of a
            request that sets none.
        limits: body size, message count, prompt length and time limits (`ServerLimits`).
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError("model_name must be a non-empty string")
    if api_key is not None and not api_key:
        raise ValueError("api_key is empty: pass None to serve without a key")
    if isinstance(max_tokens_limit, bool) or not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be an int >= 1, got {max_tokens_limit!r}")
    limits = limits if limits is not None else ServerLimits()
    served = Served()
    if decoder is not None:
        served.set(decoder)
    completions = Completions(served, model_name, max_tokens_limit, limits)
    registry = registry_for(served)
    started = int(time.time())
    app = FastAPI(title="specdec", summary=f"OpenAI-compatible API serving {model_name}")
    app.state.served, app.state.completions = served, completions
    add_error_handlers(app)
    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    v1 = APIRouter(prefix="/v1", route_class=GuardedRoute)

    async def respond(body, request: Request, chat: bool):
        completions.check_model(body)
        generation = await completions.start(body, "chatcmpl" if chat else "cmpl")
        if body.stream:
            return EventStream(stream_events(generation, completions.deltas(generation), model_name, chat,
                                             body.include_usage))
        try:
            await completions.complete(generation, request.receive)
        except Exception as err:
            status, error = _failure(generation, err)
            return JSONResponse(error, status_code=status)
        text = generation.output.text
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0,
                                                                                                 "text": text}
        logprobs = await anyio.to_thread.run_sync(generation.logprobs, chat, True, False)
        return {"id": generation.id, "object": "chat.completion" if chat else "text_completion",
                "created": generation.created, "model": model_name,
                "choices": [choice | {"logprobs": logprobs, "finish_reason": generation.finish_reason}],
                "usage": generation.usage(), "specdec": generation.spec_stats()}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await respond(body, request, chat=True)

    @v1.post("/completions")
    async def text_completions(body: CompletionRequest, request: Request):
        return await respond(body, request, chat=False)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "specdec"}]}

    @app.get("/health")
    async def health():
        if served.decoder is None:
            return JSONResponse({"status": "loading", "model": model_name}, status_code=503,
                                headers={"Retry-After": str(LOADING_RETRY_SECONDS)})
        return {"status": "ok", "model": model_name, "running": served.decoder.running,
                "queued": served.decoder.queued}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(v1)
    return app
