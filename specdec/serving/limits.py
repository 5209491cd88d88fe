"""What one request may ask of `specdec serve`, and the gate every request passes first.

`RequestGate` is plain ASGI in front of the app: it checks the API key from the headers alone, and
reads the body (at most ``max_body_bytes``) before any JSON is parsed, so a request without the
key, or with a body too large, costs the server neither a parse nor more memory than the limit.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from specdec.serving.openai_api import error_body


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits of the server (each checked before any model work).

    Attributes:
        max_body_bytes: the largest request body (413 above).
        max_messages: the most messages of a chat request (400 above).
        max_prompt_tokens: the longest prompt after templating (400 above); the model's context
            bounds it too.
        request_timeout: seconds a request may take from its arrival, queueing included; past it,
            the generation is cancelled at the next step (a stream ends with an error event).
    """

    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_prompt_tokens: int = 8192
    request_timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_messages", "max_prompt_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.request_timeout, bool) or not isinstance(self.request_timeout, (int, float)) \
                or not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be a number of seconds > 0, got {self.request_timeout!r}")


async def _answer(send, status: int, body: dict, headers: tuple = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class RequestGate:
    """ASGI middleware: the API key of ``/v1`` requests, then the body size, before the app sees either.

    Args:
        app: the ASGI app behind the gate.
        api_key: the key ``/v1`` requests must send as ``Authorization: Bearer KEY`` (None: no key).
        max_body_bytes: the largest body accepted (413 above, whether announced or streamed).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = None if api_key is None else api_key.encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"].startswith("/v1"):
            refusal = self._key_refusal(headers.get(b"authorization", b""))
            if refusal is not None:
                await _answer(send, 401, error_body(refusal, code="invalid_api_key"))
                return
        announced = headers.get(b"content-length")
        if announced is not None and (not announced.isdigit() or int(announced) > self.max_body_bytes):
            await _answer(send, 413, error_body(f"the request body is larger than this server's limit of "
                                                f"{self.max_body_bytes} bytes"))
            return
        body, more, disconnected = [], True, False
        size = 0
        while more:  # read the whole body now, counting as it comes (a chunked body announces no size)
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _answer(send, 413, error_body(f"the request body is larger than this server's limit of "
                                                    f"{self.max_body_bytes} bytes"))
                return
            body.append(chunk)
            more = message.get("more_body", False)
        if disconnected:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # after the body: the disconnect, whenever it comes

        await self.app(scope, replay, send)

    def _key_refusal(self, authorization: bytes) -> str | None:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
        if not secrets.compare_digest(token.strip(), self.expected):
            return "Incorrect API key provided"
        return None
