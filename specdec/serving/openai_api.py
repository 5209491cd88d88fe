"""The OpenAI API's request bodies (``/v1/chat/completions``, ``/v1/completions``) and its error shape.

Fields the server does not use are ignored, as OpenAI clients send some (``user``, ``logprobs``
defaults, ...). Values out of range fail validation; the server answers those with a 400 in the
OpenAI error shape (`error_body`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI bounds it
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI bounds it


class APIError(Exception):
    """A request the server refuses, answered as ``{"error": {...}}`` with ``status``.

    Args:
        status: the HTTP status (400, 401, 404, ...).
        message: what is wrong, for the client.
        param: the request field at fault, if one is.
        code: OpenAI's machine-readable code (``"invalid_api_key"``, ``"model_not_found"``, ...).
        error_type: OpenAI's error ``type``.
        headers: extra response headers (``Retry-After`` on 429 and 503).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> dict:
        """The error as OpenAI sends it (`error_body`)."""
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class SamplingRequest(BaseModel):
    """The fields both endpoints share. Unset sampling fields take OpenAI's defaults (temperature
    1, top_p 1); ``temperature=0`` decodes greedily. ``max_completion_tokens`` is the newer name of
    ``max_tokens`` (it wins when both are given). ``response_format`` constrains the output
    (`specdec.Constraint.from_response_format`: text, json_object, json_schema; regex and grammar
    as specdec's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError(f"n={n} is not supported: this server generates one choice per request (n=1)")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_LENGTH for s in strings):
            raise ValueError(f"a stop string may hold at most {MAX_STOP_LENGTH} characters")
        return stop

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (empty when unset)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def max_tokens_field(self) -> tuple[str, int | None]:
        """The name of the length field the client set, and its value (``None``: unset)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``. ``logprobs=True`` returns each token's log-probability, with
    the ``top_logprobs`` most likely tokens' (0 to 20; needs ``logprobs``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``. ``logprobs`` (0 to 5): each token's log-probability, with that many
    most likely tokens'."""

    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs
