"""The OpenAI-compatible HTTP API over an :class:`~loraplex.serve.engine.Engine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming with SSE or not), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text), and the admin endpoints ``POST /v1/load_lora_adapter`` /
``POST /v1/unload_lora_adapter`` (``Authorization: Bearer <admin token>``; paths confined to the adapter roots).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a response says which adapters
served it in ``x_loraplex: {"served_by": [...], "arm": ...}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters.io import check_path_allowed, load_adapter
from loraplex.api import Plex
from loraplex.errors import LoraplexError, PathNotAllowedError, UnknownAdapterError
from loraplex.serve import schemas
from loraplex.serve.engine import Delta, Engine, EngineError, Final, QueueFull, RequestHandle, RequestTooLarge
from loraplex.serve.metrics import CONTENT_TYPE
from loraplex.serve.registry import ModelRegistry, Resolved, ResolveError
from loraplex.serve.sampling import SamplingParams

log = logging.getLogger("loraplex.serve")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.extra = status, message, code, param, extra

    def response(self) -> JSONResponse:
        return JSONResponse(schemas.error_body(self.status, self.message, self.code, self.param, **self.extra),
                            status_code=self.status)


def api_error(exc: BaseException) -> ApiError:
    """The HTTP answer to an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        return ApiError(404, str(exc), "model_not_found", "model", known_models=list(exc.known))
    if isinstance(exc, ResolveError):
        return ApiError(400, str(exc), exc.code, "model")
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), exc.code)
    if isinstance(exc, RequestTooLarge):
        return ApiError(400, str(exc), exc.code)
    if isinstance(exc, EngineError):
        return ApiError(exc.status, str(exc), exc.code)
    if isinstance(exc, PathNotAllowedError):
        return ApiError(403, str(exc), "path_not_allowed", "lora_path")
    if isinstance(exc, (LoraplexError, ValueError)):
        return ApiError(400, str(exc), "invalid_request")
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, schemas.describe(exc), "invalid_request") from None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", "invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON in the request body: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    return body


class _Metered:
    """ASGI middleware: count every HTTP request by route and status code (streaming included)."""

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.requests.inc(endpoint=endpoint, status=status["code"])


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape (shared by the completion and the classify apps)."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LoraplexError)
    async def _loraplex_error(_: Request, exc: LoraplexError) -> JSONResponse:
        return api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return ApiError(400, f"invalid request: {exc.errors()[:3]}", "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else None).response()


def create_app(engine: Engine, registry: ModelRegistry | None = None, *, admin_token: str | None = None,
               adapter_roots: Sequence[str] = (), base_id: str = "base", max_choices: int = 16,
               unload_timeout: float = 30.0, add_special_tokens: bool = True) -> FastAPI:
    """The FastAPI app. ``registry`` defaults to one with just the base model and the registered adapters."""
    registry = registry or ModelRegistry(engine.plex, base_id=base_id)
    tokenizer = engine.tokenizer
    vocab = int(getattr(getattr(engine.model, "config", None), "vocab_size", 0) or 0)
    roots = [str(r) for r in adapter_roots]
    metrics = engine.metrics

    app = FastAPI(title="loraplex", description="OpenAI-compatible multi-LoRA server", docs_url=None,
                  redoc_url=None)
    app.state.engine, app.state.registry = engine, registry
    app.add_middleware(_Metered, metrics=metrics)

    install_error_handlers(app)

    # ------------------------------------------------------------------ helpers
    def encode(text: str, special: bool) -> list[int]:
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", "no_tokenizer")
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""

    def check_ids(ids: list[int]) -> None:
        bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "invalid_token",
                           "prompt")

    if registry.router is not None:
        # A router may run the base model (a routing pass with adapters off): it runs on the engine's worker,
        # between two steps, so it never overlaps a batch; `auto` requests arriving meanwhile share one pass.
        routes = registry.batch_routing(engine.call_on_worker)
        app.state.route_batches = routes.batch_sizes

    async def resolve(model: str, prompt: str, user: str | None) -> Resolved:
        if registry.router is not None:  # routing blocks on the worker: wait for it off the event loop
            return await anyio.to_thread.run_sync(lambda: registry.resolve(model, prompt=prompt, user=user))
        return registry.resolve(model, prompt=prompt, user=user)

    def sampling(req: Any, max_tokens: int, j: int) -> SamplingParams:
        bad = req.unsupported()
        if bad:
            raise ApiError(400, f"parameter {bad!r} is not supported by this server", "unsupported_parameter", bad)
        stops = req.stop_list()
        if len(stops) > 16:
            raise ApiError(400, "at most 16 stop sequences are allowed", "invalid_request", "stop")
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(stops),
                                  seed=None if req.seed is None else req.seed + j, ignore_eos=req.ignore_eos)
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_request") from None

    def submit(prompts: list[list[int]], resolved: Resolved, req: Any, max_tokens: Any) -> list[RequestHandle]:
        if len(prompts) * req.n > max_choices:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={req.n} is more than this server's limit of "
                                f"{max_choices} choices per request", "too_many_choices", "n")
        items = []
        for ids in prompts:
            check_ids(ids)
            mt = max_tokens(ids) if callable(max_tokens) else max_tokens
            for j in range(req.n):
                items.append((ids, resolved.choice, sampling(req, mt, j)))
        return engine.submit_many(items)

    def chat_default_max(ids: list[int]) -> int:
        room = (engine.context_length - len(ids)) if engine.context_length else engine.max_tokens_cap
        return max(1, min(engine.max_tokens_cap, room))

    # ------------------------------------------------------------------ generation endpoints
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = _parse(schemas.CompletionRequest, await _json_body(request))
        p = req.prompt
        if isinstance(p, str):
            prompts, first_text = [encode(p, add_special_tokens)], p
        elif p and all(isinstance(x, str) for x in p):
            prompts, first_text = [encode(x, add_special_tokens) for x in p], p[0]
        elif p and all(isinstance(x, int) for x in p):
            prompts, first_text = [list(p)], None
        elif p and all(isinstance(x, list) for x in p):
            prompts, first_text = [list(x) for x in p], None
        else:
            raise ApiError(400, "prompt must be a non-empty string, list of strings, or token id list(s)",
                           "invalid_request", "prompt")
        if first_text is None:
            check_ids(prompts[0])
            first_text = decode(prompts[0])
        resolved = await resolve(req.model, first_text, req.user)
        handles = submit(prompts, resolved, req, req.max_tokens)
        return await respond(request, "text_completion", req, resolved, handles, prompts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = _parse(schemas.ChatCompletionRequest, await _json_body(request))
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_request", "messages") from None
        route_text = "\n".join(m["content"] for m in messages)
        resolved = await resolve(req.model, route_text, req.user)
        template = registry.chat_template(resolved)
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so it cannot take chat messages", "no_tokenizer")
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "no chat template: neither the tokenizer nor the adapter defines one; use "
                                "/v1/completions", "no_chat_template")
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may reject a conversation (e.g. role order)
            raise ApiError(400, f"the chat template rejected these messages: {exc}", "invalid_messages",
                           "messages") from None
        prompts = [encode(text, False)]
        max_tokens = req.max_completion_tokens or req.max_tokens or chat_default_max
        handles = submit(prompts, resolved, req, max_tokens)
        return await respond(request, "chat.completion", req, resolved, handles, prompts)

    async def respond(request: Request, kind: str, req: Any, resolved: Resolved, handles: list[RequestHandle],
                      prompts: list[list[int]]) -> Any:
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        n_prompt = sum(len(p) for p in prompts)
        info = resolved.info()
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _sse(handles, kind, rid, created, req.model, info, n_prompt, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = await _wait(request, handles)
        for f in finals:
            if f.error is not None:
                raise api_error(f.error)
        choices = []
        for i, f in enumerate(finals):
            if kind == "chat.completion":
                choices.append({"index": i, "message": {"role": "assistant", "content": f.text},
                                "finish_reason": f.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": f.text, "finish_reason": f.finish_reason, "logprobs": None})
        n_completion = sum(f.completion_tokens for f in finals)
        return JSONResponse({
            "id": rid, "object": kind, "created": created, "model": req.model, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion},
            "x_loraplex": info,
        })

    # ------------------------------------------------------------------ info endpoints
    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": registry.list_models()}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> Any:
        for card in registry.list_models():
            if card["id"] == model_id:
                return card
        raise api_error(UnknownAdapterError(model_id, registry.known()))

    @app.get("/health")
    async def health() -> Any:
        body = {"status": "ok" if engine.alive else "unavailable", "queue_depth": engine.queue_depth,
                "running": engine.running_count, "adapters": len(engine.plex.adapters),
                "resident": len(engine.plex.resident())}
        if not engine.alive:
            body["error"] = str(engine.dead or "engine stopped")
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ admin endpoints
    install_admin_endpoints(
        app, admin_token=admin_token, roots=roots, registry=registry, plex=engine.plex, metrics=metrics,
        register=lambda name, adapter, replace: engine.register_adapter(name, adapter, replace=replace,
                                                                        timeout=unload_timeout),
        unload=lambda name, timeout: engine.unload_adapter(name, timeout=timeout), unload_timeout=unload_timeout)

    return app


# --------------------------------------------------------------------------- admin endpoints
def install_admin_endpoints(app: FastAPI, *, admin_token: str | None, roots: Sequence[str], registry: ModelRegistry,
                            plex: Plex, metrics: Any, register: Callable[[str, Any, bool], None],
                            unload: Callable[[str, float], None], unload_timeout: float = 30.0) -> None:
    """``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's shape) on ``app``.

    Both need ``Authorization: Bearer <admin_token>`` (no token configured: 403); loads read only under ``roots``.
    ``register(name, adapter, replace)`` and ``unload(name, timeout)`` do the change safely for the app's worker
    (they run on a thread, so requests keep flowing while an adapter is read from disk)."""
    def authorize(request: Request) -> None:
        if not admin_token:
            raise ApiError(403, "admin endpoints are disabled: start the server with an admin token "
                                "(--admin-token or LORAPLEX_ADMIN_TOKEN)", "admin_disabled")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "this endpoint needs the admin token: send 'Authorization: Bearer <token>'",
                           "missing_token")
        if not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise ApiError(401, "invalid admin token", "invalid_token")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Any:
        authorize(request)
        req = _parse(schemas.LoadAdapterRequest, await _json_body(request))
        name = req.lora_name
        why = registry.reserved(name)
        if why:
            raise ApiError(400, why, "invalid_name", "lora_name")
        if name in plex and not req.replace:
            raise ApiError(409, f"adapter {name!r} is already loaded (send \"replace\": true to swap it)",
                           "adapter_exists", "lora_name")
        if not roots:
            raise ApiError(403, "no adapter roots are configured (--adapter-root), so no path may be loaded",
                           "path_not_allowed", "lora_path")
        try:
            path = check_path_allowed(req.lora_path, roots)
        except PathNotAllowedError as exc:
            metrics.adapter_loads.inc(adapter=name, result="refused")
            raise api_error(exc) from None
        t0 = time.perf_counter()
        try:  # disk -> CPU on a worker thread: requests keep flowing meanwhile
            adapter = await anyio.to_thread.run_sync(lambda: load_adapter(
                path, name, trust_pickle=plex.trust_pickle, roots=roots, dtype=plex.dtype))
            await anyio.to_thread.run_sync(lambda: register(name, adapter, bool(req.replace)))
        except (LoraplexError, OSError, ValueError) as exc:
            metrics.adapter_loads.inc(adapter=name, result="error")
            err = api_error(exc)
            if err.status == 400:
                err.message = f"failed to load adapter {name!r} from {req.lora_path}: {exc}"
                err.code = "adapter_load_failed"
            raise err from None
        seconds = time.perf_counter() - t0
        metrics.adapter_loads.inc(adapter=name, result="ok")
        metrics.adapter_load_seconds.set(seconds, adapter=name)
        return {"object": "lora_adapter", "id": name, "status": "loaded", "path": str(path),
                "replaced": bool(req.replace), "load_seconds": round(seconds, 6)}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Any:
        authorize(request)
        req = _parse(schemas.UnloadAdapterRequest, await _json_body(request))
        name = req.lora_name
        if name not in plex:
            raise api_error(UnknownAdapterError(name, plex.adapters))
        timeout = unload_timeout if req.timeout is None else req.timeout
        try:
            await anyio.to_thread.run_sync(lambda: unload(name, timeout))
        except (LoraplexError, OSError) as exc:
            metrics.adapter_unloads.inc(adapter=name, result="error")
            raise api_error(exc) from None
        metrics.adapter_unloads.inc(adapter=name, result="ok")
        return {"object": "lora_adapter", "id": name, "status": "unloaded"}


# --------------------------------------------------------------------------- waiting and streaming
async def _watch_disconnect(request: Request, interval: float = 0.05) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(interval)


async def until_disconnect(request: Request, awaitable: Any, on_hangup: Callable[[], None] | None = None) -> Any:
    """The awaitable's result, unless the client hangs up first (or this handler is cancelled): then
    ``on_hangup()`` runs, the awaitable is cancelled and the answer is a 499 :class:`ApiError`."""
    results = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not results.done():
            if on_hangup is not None:
                on_hangup()
            results.cancel()
        watcher.cancel()
    if not results.done() or results.cancelled():
        raise ApiError(499, "client closed the request", "client_closed")
    return results.result()


async def _wait(request: Request, handles: list[RequestHandle]) -> list[Final]:
    """Every handle's final event; a client that hangs up cancels its requests."""
    def cancel_all() -> None:
        for h in handles:
            h.cancel()

    return await until_disconnect(request, asyncio.gather(*(h.afinal() for h in handles)), cancel_all)


def _sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Delta | Final]]:
    """(choice index, event) from several handles, as they come."""
    if len(handles) == 1:
        async for ev in handles[0]:
            yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        async for ev in h:
            await q.put((i, ev))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, ev = await q.get()
            if isinstance(ev, Final):
                left -= 1
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def _sse(handles: list[RequestHandle], kind: str, rid: str, created: int, model: str, info: dict,
               n_prompt: int, include_usage: bool) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                "x_loraplex": info}

    completion = 0
    try:
        if chat:
            for i in range(len(handles)):
                yield _sse_line(chunk(i, "", None, role=True))
        async for i, ev in _events(handles):
            if isinstance(ev, Delta):
                yield _sse_line(chunk(i, ev.text, None))
            elif ev.error is not None:
                err = api_error(ev.error)
                yield _sse_line(schemas.error_body(err.status, err.message, err.code, err.param, **err.extra))
            else:
                completion += ev.completion_tokens
                yield _sse_line(chunk(i, None if chat else "", ev.finish_reason))
        if include_usage:
            yield _sse_line({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion,
                                       "total_tokens": n_prompt + completion}, "x_loraplex": info})
        yield "data: [DONE]\n\n"
    finally:  # client gone (or done): stop whatever still runs
        for h in handles:
            if not h.done:
                h.cancel()


def create_classify_app(plex: Plex, **kwargs: Any) -> FastAPI:
    """The encoder app (``/v1/classify``, ``/v1/embeddings``); see
    :func:`loraplex.serve.classify.create_classify_app`."""
    from loraplex.serve.classify import create_classify_app as make

    return make(plex, **kwargs)


__all__ = ["ApiError", "api_error", "create_app", "create_classify_app", "install_error_handlers"]
