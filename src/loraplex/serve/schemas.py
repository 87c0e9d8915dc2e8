"""OpenAI-compatible request bodies (pydantic) and the OpenAI error shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: ``max_tokens`` of a completion request that sets none (OpenAI's default).
COMPLETION_MAX_TOKENS = 16


class RequestBody(BaseModel):
    """A request body: unknown fields are ignored (as OpenAI's server does)."""

    model_config = ConfigDict(extra="ignore")


class _Sampling(RequestBody):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension
    logprobs: Any = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not implement."""
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.presence_penalty not in (None, 0, 0.0):
            return "presence_penalty"
        if self.frequency_penalty not in (None, 0, 0.0):
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=COMPLETION_MAX_TOKENS, ge=1)  # null (as OpenAI's client sends it): the default
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any) -> Any:
        return COMPLETION_MAX_TOKENS if v is None else v

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class ContentPart(RequestBody):
    type: str
    text: str | None = None


class ChatMessage(RequestBody):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"message content part of type {p.type!r} is not supported (text only)")
            parts.append(p.text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        return super().unsupported()


class LoadAdapterRequest(RequestBody):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)
    replace: bool = False


class UnloadAdapterRequest(RequestBody):
    lora_name: str = Field(min_length=1)
    timeout: float | None = Field(default=None, ge=0.0, le=3600.0)


def describe(exc: ValidationError) -> str:
    """A one-line, human-readable summary of a validation error."""
    msgs = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msgs.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(msgs)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI sends it."""
    err = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}
    err.update(extra)
    return {"error": err}
