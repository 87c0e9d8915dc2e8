"""OpenAI-compatible request bodies (pydantic) and the OpenAI error shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: ``max_tokens`` of a completion request that sets none (OpenAI's default).
COMPLETION_MAX_TOKENS = 16


class RequestBody(BaseModel):
    """A request body: unknown fields are ignored (as OpenAI's server does)."""

    model_config = ConfigDict(extra="ignore")


#: Fields of OpenAI's and vLLM's request bodies that this server does not implement, with the values that ask for
#: nothing beyond what it does (any other value is a 400 naming the field).
UNIMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "prompt_logprobs": (None,), "bad_words": (None, []), "allowed_token_ids": (None, []),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "truncate_prompt_tokens": (None,), "return_tokens_as_token_ids": (None, False),
    "logits_processors": (None, []), "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]),
}
#: Fields that change nothing about the answer, accepted with any value.
IGNORED = frozenset({"store", "metadata", "service_tier", "parallel_tool_calls", "priority", "request_id",
                     "reasoning_effort"})


class _Sampling(RequestBody):
    """A generation request: fields the server does not implement (or does not know) are a 400 naming them."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's sampling extensions
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> str | None:
        """The first field set to something this server does not implement (unknown fields included)."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name not in UNIMPLEMENTED or value not in UNIMPLEMENTED[name]:
                return name
        return None

    def top_logprobs_count(self) -> int | None:
        """Alternatives per output token (None: no logprobs)."""
        raise NotImplementedError

    def echo_logprobs(self) -> int | None:
        """Alternatives per prompt token (None: no prompt logprobs)."""
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=COMPLETION_MAX_TOKENS, ge=1)  # null (as OpenAI's client sends it): the default
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any) -> Any:
        return COMPLETION_MAX_TOKENS if v is None else v

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("logprobs of a completion is an integer 0-20 (alternatives per token), not a boolean")
        return v

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def echo_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


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
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadAdapterRequest(RequestBody):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)
    replace: bool = False
    load_inplace: bool = False  # vLLM's name for ``replace``

    @property
    def replacing(self) -> bool:
        """``replace`` or vLLM's ``load_inplace``."""
        return self.replace or self.load_inplace


class UnloadAdapterRequest(RequestBody):
    lora_name: str = Field(min_length=1)
    timeout: float | None = Field(default=None, ge=0.0, le=3600.0)


class LoadCompositionRequest(RequestBody):
    name: str = Field(min_length=1, max_length=200)
    spec: str = Field(min_length=1, max_length=10_000)
    replace: bool = False


class UnloadCompositionRequest(RequestBody):
    name: str = Field(min_length=1)


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
