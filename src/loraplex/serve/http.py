"""The HTTP layer shared by the completion app (:mod:`loraplex.serve.app`), the encoder app
(:mod:`loraplex.serve.classify`) and the Ray Serve ingress (:mod:`loraplex.distributed.deployments`).

* Errors: :class:`ApiError` answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``;
  :func:`api_error` maps loraplex's exceptions to statuses; :func:`install_error_handlers` makes every error,
  an unexpected one included, such a JSON answer (never a plain-text 500).
* Bodies: :func:`json_body` reads at most ``max_body_bytes`` (413 past it) and refuses malformed JSON, nesting too
  deep to parse, and strings with lone UTF-16 surrogates (``"\\ud800"``) with a 400; :func:`validate_body` checks
  it against a pydantic model (400 naming the field).
* :class:`RequestMetering`: ASGI middleware counting requests by route and status.
* :func:`install_info_endpoints`: ``/v1/models``, ``/v1/models/{id}``, ``/health`` and ``/metrics``.
* :func:`install_admin_endpoints`: ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (admin token, paths
  confined to the adapter roots; an unload that would break a composition is 409), ``/v1/load_composition`` and
  ``/v1/unload_composition`` (compositions checked when defined).
* :func:`until_disconnect`: await a result unless the client hangs up first (499).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from typing import Any, Callable, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters.io import check_path_allowed, load_adapter
from loraplex.api import Plex
from loraplex.errors import LoraplexError, PathNotAllowedError, UnknownAdapterError
from loraplex.serve import schemas
from loraplex.serve.engine import EngineError, QueueFull, RequestTooLarge
from loraplex.serve.merges import MergeCache, merge_key
from loraplex.serve.metrics import CONTENT_TYPE
from loraplex.serve.registry import ModelRegistry, ResolveError, is_merge_name, parse_merge

log = logging.getLogger("loraplex.serve")

#: Default limit of a request body (bytes): larger bodies are answered 413.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Bodies larger than this are parsed on a worker thread, so the event loop keeps answering others.
_PARSE_OFF_LOOP_BYTES = 256 * 1024
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.extra = status, message, code, param, extra

    def body(self) -> dict[str, Any]:
        return schemas.error_body(self.status, self.message, self.code, self.param, **self.extra)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error(exc: BaseException) -> ApiError:
    """The HTTP answer to an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownAdapterError):  # a short body: all names when few, else near matches and the count
        return ApiError(404, str(exc), "model_not_found", "model", known_models=exc.listed(),
                        known_count=len(exc.known))
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


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape, unexpected exceptions included (a JSON 500, logged)."""

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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()


# --------------------------------------------------------------------------- bodies
def validate_body(model: type[BaseModel], body: Any) -> Any:
    """``body`` validated as ``model``; a 400 :class:`ApiError` naming the bad fields."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, schemas.describe(exc), "invalid_request") from None


def lone_surrogate(value: Any) -> str | None:
    """The path (``messages.0.content``) of the first string (or key) in ``value`` holding a lone UTF-16
    surrogate, which no tokenizer can encode; None when there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                p = f"{path}.{k}" if path else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "body"
                stack.append((p, x))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
    return None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body's JSON object; a 400 :class:`ApiError` for anything else (malformed, not an object, nested
    too deep to parse, an integer of more than 4300 digits, a string with a lone surrogate)."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", "invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the JSON in the request body is nested too deeply", "invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON in the request body: {exc}", "invalid_json") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise ApiError(400, f"invalid JSON value in the request body: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    if _SURROGATE_ESCAPE.search(raw):
        where = lone_surrogate(body)
        if where is not None:
            raise ApiError(400, f"{where}: the string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                f"escape), which is not valid Unicode text", "invalid_unicode", where.split(".")[0])
    return body


def body_limit(request: Request) -> int:
    """The app's request body limit in bytes (``app.state.max_body_bytes``, default :data:`MAX_BODY_BYTES`)."""
    return int(getattr(request.app.state, "max_body_bytes", None) or MAX_BODY_BYTES)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (see :func:`parse_json_object`); a 413 :class:`ApiError` past the app's body
    limit. A larger body is still read to its end (discarded), so the client gets the answer, not a reset."""
    limit = body_limit(request)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise ApiError(413, f"the request body has {size} bytes; this server accepts at most {limit} bytes "
                            f"(max_body_bytes)", "request_too_large")
    raw = b"".join(chunks)
    if len(raw) > _PARSE_OFF_LOOP_BYTES:
        return await anyio.to_thread.run_sync(parse_json_object, raw)
    return parse_json_object(raw)


# --------------------------------------------------------------------------- cheap length checks
#: A prompt longer than (limit + 1) x this many characters has a prefix tokenized first (see
#: :func:`tokens_over_limit`).
PREFIX_CHARS_PER_TOKEN = 16


def tokens_over_limit(count: Callable[[str], int], text: str, limit: int) -> int | None:
    """The token count of a prefix of ``text`` when that alone is over ``limit`` (so ``text`` is too), else None.

    ``count(s)`` tokenizes ``s``. Short texts (at most ``(limit + 1) * PREFIX_CHARS_PER_TOKEN`` characters) return
    None at once; for a longer one only that many characters, cut back to the last whitespace, are tokenized, so a
    megabyte prompt is refused after tokenizing a few kilobytes. None means: tokenize the whole text and check."""
    chars = (limit + 1) * PREFIX_CHARS_PER_TOKEN
    if len(text) <= chars:
        return None
    prefix = text[:chars]
    cut = max(prefix.rfind(" "), prefix.rfind("\n"), prefix.rfind("\t"))
    if cut > 0:
        prefix = prefix[:cut]
    n = count(prefix)
    return n if n > limit else None


# --------------------------------------------------------------------------- middleware
class RequestMetering:
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


def new_app(*, title: str, description: str, metrics: Any, max_body_bytes: int = MAX_BODY_BYTES,
            lifespan: Any = None) -> FastAPI:
    """A FastAPI app with the shared pieces: OpenAI-shaped errors, request metering, the body limit."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    app = FastAPI(title=title, description=description, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.max_body_bytes = int(max_body_bytes)
    app.add_middleware(RequestMetering, metrics=metrics)
    install_error_handlers(app)
    return app


# --------------------------------------------------------------------------- info endpoints
def install_info_endpoints(app: FastAPI, *, cards: Callable[..., list[dict[str, Any]]],
                           known: Callable[[], list[str]], worker: Any, health: Callable[[], dict[str, Any]],
                           metrics: Any, count: Callable[[], int] | None = None) -> None:
    """``GET /v1/models`` (``cards(limit=, after=)``), ``GET /v1/models/{id}`` (``cards(only=id)``), ``GET /health`` and ``GET /metrics``.

    ``/v1/models`` lists at most ``limit`` adapters (default and most :data:`MODELS_PAGE`) after ``after``, with
    ``has_more``, ``last_id`` and the adapter count (``count()``) for the next page; it is built off the event
    loop, so a large listing never stalls ``/health`` or the completions. ``worker`` has ``alive`` and ``dead``
    (the engine or the encoder batcher); ``health()`` gives the body's fields besides ``status`` (and ``error``
    when the worker is down, answered 503)."""

    @app.get("/v1/models")
    async def models(limit: int | None = None, after: str | None = None) -> Any:
        if limit is not None and limit < 1:
            raise ApiError(400, f"limit must be >= 1, got {limit}", "invalid_request", "limit")
        page = min(limit or MODELS_PAGE, MODELS_PAGE)
        data = await anyio.to_thread.run_sync(lambda: cards(limit=page + 1, after=after))
        adapters = [c for c in data if c.get("x_loraplex_kind") in ("adapter", "merge")]
        more = len(adapters) > page
        if more:
            extra = adapters[page]
            data = [c for c in data if c is not extra]
        body: dict[str, Any] = {"object": "list", "data": data, "has_more": more}
        if more:
            body["last_id"] = adapters[page - 1]["id"]
        if count is not None:
            body["x_loraplex"] = {"adapters": count()}
        return body

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> Any:
        found = await anyio.to_thread.run_sync(lambda: cards(only=model_id))
        if found:
            return found[0]
        raise api_error(UnknownAdapterError(model_id, known()))

    @app.get("/health")
    async def health_check() -> Any:
        alive = worker.alive
        body = {"status": "ok" if alive else "unavailable", **health()}
        if not alive:
            body["error"] = str(worker.dead or "the worker stopped")
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)


#: Most adapters one ``GET /v1/models`` lists (the next page: ``?after=<last_id>``).
MODELS_PAGE = 1000


# --------------------------------------------------------------------------- admin endpoints
def check_admin_token(request: Request, admin_token: str | None) -> None:
    """Raise a 403 (no token configured) or 401 (missing or wrong ``Authorization: Bearer``) :class:`ApiError`."""
    if not admin_token:
        raise ApiError(403, "admin endpoints are disabled: start the server with an admin token "
                            "(--admin-token or LORAPLEX_ADMIN_TOKEN)", "admin_disabled")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "this endpoint needs the admin token: send 'Authorization: Bearer <token>'",
                       "missing_token")
    if not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
        raise ApiError(401, "invalid admin token", "invalid_token")


def install_admin_endpoints(app: FastAPI, *, admin_token: str | None, roots: Sequence[str], registry: ModelRegistry,
                            plex: Plex, metrics: Any, register: Callable[[str, Any, bool], None],
                            unload: Callable[[str, float], None], unload_timeout: float = 30.0,
                            merges: MergeCache | None = None) -> None:
    """``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's shape), ``POST
    /v1/load_composition`` and ``POST /v1/unload_composition`` (loraplex's) on ``app``.

    All need ``Authorization: Bearer <admin_token>`` (no token configured: 403); loads read only under ``roots``:
    the folder and each file read from it, symlinks resolved (403 naming the file otherwise); a folder that does
    not exist inside them is 404. Unloading an adapter that a composition uses is 409 naming the compositions
    (remove them first with ``/v1/unload_composition``). ``register(name, adapter, replace)`` and
    ``unload(name, timeout)`` do the change safely for the app's worker (they run on a thread, so requests keep
    flowing while an adapter is read from disk). ``merges``: the app's :class:`~loraplex.serve.merges.MergeCache`,
    which builds (and pins) the merge of a ``merge(...)`` composition when it is defined."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Any:
        check_admin_token(request, admin_token)
        req = validate_body(schemas.LoadAdapterRequest, await json_body(request))
        name = req.lora_name
        why = registry.reserved(name)
        if why:
            raise ApiError(400, why, "invalid_name", "lora_name")
        if name in plex and not req.replacing:
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
        if not path.exists():  # inside the roots, but nothing there: vLLM answers 404 too
            metrics.adapter_loads.inc(adapter=name, result="not_found")
            raise ApiError(404, f"adapter folder not found: {req.lora_path}", "adapter_not_found", "lora_path")
        t0 = time.perf_counter()
        try:  # disk -> CPU on a worker thread: requests keep flowing meanwhile
            adapter = await anyio.to_thread.run_sync(lambda: load_adapter(
                path, name, trust_pickle=plex.trust_pickle, roots=roots, dtype=plex.dtype))
            await anyio.to_thread.run_sync(lambda: register(name, adapter, bool(req.replacing)))
        except (LoraplexError, OSError, ValueError) as exc:  # a file inside may be a symlink out of the roots: 403
            metrics.adapter_loads.inc(adapter=name, result="refused" if isinstance(exc, PathNotAllowedError)
                                      else "error")
            err = api_error(exc)
            if err.status == 400:
                err.message = f"failed to load adapter {name!r} from {req.lora_path}: {exc}"
                err.code = "adapter_load_failed"
            raise err from None
        seconds = time.perf_counter() - t0
        metrics.adapter_loads.inc(adapter=name, result="ok")
        metrics.adapter_load_seconds.set(seconds, adapter=name)
        return {"object": "lora_adapter", "id": name, "status": "loaded", "path": str(path),
                "replaced": bool(req.replacing), "load_seconds": round(seconds, 6)}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Any:
        check_admin_token(request, admin_token)
        req = validate_body(schemas.UnloadAdapterRequest, await json_body(request))
        name = req.lora_name
        if name not in plex or is_merge_name(name):
            raise api_error(UnknownAdapterError(name, [a for a in plex.adapters if not is_merge_name(a)]))
        users = registry.compositions_using(name)
        if users:
            listed = ", ".join(repr(u) for u in users)
            raise ApiError(409, f"adapter {name!r} is used by composition(s) {listed}; remove them first "
                                f"(POST /v1/unload_composition) and unload again; nothing was changed",
                           "adapter_in_use", "lora_name", compositions=users)
        timeout = unload_timeout if req.timeout is None else req.timeout
        try:
            await anyio.to_thread.run_sync(lambda: unload(name, timeout))
        except (LoraplexError, OSError) as exc:
            metrics.adapter_unloads.inc(adapter=name, result="error")
            raise api_error(exc) from None
        metrics.adapter_unloads.inc(adapter=name, result="ok")
        return {"object": "lora_adapter", "id": name, "status": "unloaded"}

    @app.post("/v1/load_composition")
    async def load_composition(request: Request) -> Any:
        check_admin_token(request, admin_token)
        req = validate_body(schemas.LoadCompositionRequest, await json_body(request))
        old = registry.compositions.get(req.name)
        try:
            registry.add_composition(req.name, req.spec, replace=req.replace)
        except ResolveError as exc:
            status = 409 if exc.code == "name_exists" else 400
            raise ApiError(status, str(exc), exc.code,
                           "name" if exc.code in ("name_exists", "invalid_name") else "spec") from None
        node = parse_merge(req.spec)
        if node is not None and merges is not None:
            merges.start(node, pinned=True)  # built in the background; its first request waits for it
        if old is not None:
            release_merge(old)
        return {"object": "composition", "id": req.name, "spec": registry.compositions[req.name],
                "status": "loaded"}

    @app.post("/v1/unload_composition")
    async def unload_composition(request: Request) -> Any:
        check_admin_token(request, admin_token)
        req = validate_body(schemas.UnloadCompositionRequest, await json_body(request))
        try:
            spec = registry.remove_composition(req.name)
        except UnknownAdapterError:
            raise ApiError(404, f"no composition {req.name!r}; compositions: "
                                f"{', '.join(registry.compositions) or '(none)'}", "composition_not_found",
                           "name") from None
        release_merge(spec)
        return {"object": "composition", "id": req.name, "status": "unloaded"}

    def release_merge(spec: str) -> None:
        """Unpin the merge of a composition spec that no composition names any more (the LRU may evict it)."""
        node = parse_merge(spec)
        if node is None or merges is None:
            return
        key = merge_key(node)
        if not any(m is not None and merge_key(m) == key for m in map(parse_merge, registry.compositions.values())):
            merges.unpin(node)


# --------------------------------------------------------------------------- waiting
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


__all__ = ["MAX_BODY_BYTES", "MODELS_PAGE", "PREFIX_CHARS_PER_TOKEN", "ApiError", "RequestMetering", "api_error", "body_limit",
           "check_admin_token", "install_admin_endpoints", "install_error_handlers", "install_info_endpoints",
           "json_body", "lone_surrogate", "new_app", "parse_json_object", "tokens_over_limit", "until_disconnect",
           "validate_body"]
