"""The Ray Serve application: ``LoraplexIngress`` (the OpenAI HTTP API) in front of ``LoraplexReplica`` x N.

Each replica owns a full single-process loraplex server (base model, :class:`~loraplex.serve.engine.Engine` with
continuous mixed-adapter batching, its own OpenAI app) and loads adapters on demand from the shared store through
``@serve.multiplexed``: a request's adapter set is its multiplexed model id (see :mod:`loraplex.distributed.naming`),
so Ray routes it to a replica that already holds that set when there is one, and a replica evicts its least
recently used set past ``max_adapters_per_replica``. The ingress resolves the request's ``model`` with the
single-process registry rules (adapters, ``blend``/``stack`` specs, compositions, A/B splits, ``auto`` via the
router), sets the multiplexed model id, and forwards the request unchanged but for ``model``. Every reply says where
it ran: ``x_loraplex.replica``, ``multiplexed_model_id``, ``replica_had_model`` (the replica held the adapter set
before this request) and ``replica_models`` (the sets it holds now).
"""


import json
import logging
import threading
import time
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from loraplex.distributed import asgi
from loraplex.distributed.adapters import AdapterSet
from loraplex.distributed.naming import adapters_of, target
from loraplex.distributed.settings import RaySettings
from loraplex.distributed.store import StoreCatalog
from loraplex.errors import LoraplexError, UnknownAdapterError
from loraplex.serve.http import ApiError, api_error, install_error_handlers, json_body

log = logging.getLogger("loraplex.distributed")

REPLICA = "LoraplexReplica"
INGRESS = "LoraplexIngress"
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


# --------------------------------------------------------------------------- replica
class ReplicaCore:
    """A replica's state and request handling (the Ray class adds ``@serve.multiplexed`` on top)."""

    def __init__(self, settings: RaySettings, replica_id: str) -> None:
        import torch

        import loraplex
        from loraplex.serve.app import create_app
        from loraplex.serve.engine import Engine
        from loraplex.serve.registry import ModelRegistry

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = settings.device or ("cuda" if settings.replica_gpus and torch.cuda.is_available() else None)
        self.settings, self.replica_id = settings, replica_id
        self.plex = loraplex.load(settings.base, device=device,
                                  dtype=getattr(torch, settings.dtype) if settings.dtype else None,
                                  max_slots=settings.max_slots, trust_pickle=settings.trust_pickle,
                                  quantize=settings.quantize)
        self.engine = Engine(self.plex, max_batch_size=settings.max_batch_size,
                             batch_window_ms=settings.batch_window_ms, max_queue=settings.max_queue,
                             max_prompt_tokens=settings.max_prompt_tokens, max_tokens_cap=settings.max_tokens_cap)
        registry = ModelRegistry(self.plex, base_id=settings.base_id, seed=settings.seed)
        self.app = create_app(self.engine, registry, base_id=settings.base_id)
        self.adapters = AdapterSet(self.engine, settings.store, trust_pickle=settings.trust_pickle,
                                   unload_timeout=settings.unload_timeout)

    def info(self, model_id: str, had: bool, extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, "replica": self.replica_id, "multiplexed_model_id": model_id, "replica_had_model": had,
                "replica_models": sorted(self.adapters.held)}

    async def handle(self, model_id: str, load: Any, path: str, body: bytes, client_model: str | None,
                     extra: dict[str, Any]) -> tuple[int, str, bytes]:
        """Run a non-streaming request; ``(status, content type, stamped body)``."""
        had = model_id in self.adapters.held
        info = self.info(model_id, had, extra)
        status, ctype, parts = 500, "application/json", []
        try:
            if model_id:
                await load(model_id)  # Ray's multiplex cache (LRU): holds the adapter set while it is cached
            async with self.adapters.using(adapters_of(model_id)):
                async for item in asgi.call(self.app, "POST", path, body):
                    if isinstance(item, tuple):
                        status, ctype = item
                    else:
                        parts.append(item)
        except (LoraplexError, OSError, ValueError) as exc:  # the adapter could not be read from the store
            return self.load_error(model_id, exc, client_model, info)
        return status, ctype, asgi.stamp_json(b"".join(parts), client_model, self.info(model_id, had, extra))

    def load_error(self, model_id: str, exc: BaseException, client_model: str | None,
                   info: dict[str, Any]) -> tuple[int, str, bytes]:
        """An OpenAI-shaped error for an adapter set that failed to load on this replica."""
        err = api_error(exc)
        if err.status in (400, 500):
            err = ApiError(500 if isinstance(exc, OSError) else 400,
                           f"failed to load {model_id!r} from the adapter store: {exc}", "adapter_load_failed",
                           "model")
        return err.status, "application/json", asgi.stamp_json(bytes(err.response().body), client_model, info)

    async def stream(self, model_id: str, load: Any, path: str, body: bytes, client_model: str | None,
                     extra: dict[str, Any]) -> AsyncIterator[Any]:
        """Run a streaming request: yields ``(status, content type)``, then stamped body bytes."""
        had = model_id in self.adapters.held
        info = self.info(model_id, had, extra)
        try:
            if model_id:
                await load(model_id)
        except (LoraplexError, OSError, ValueError) as exc:
            status, ctype, out = self.load_error(model_id, exc, client_model, info)
            yield status, ctype
            yield out
            return
        stamper = asgi.SSEStamper(client_model, info)
        async with self.adapters.using(adapters_of(model_id)):
            is_sse = False
            parts: list[bytes] = []
            async for item in asgi.call(self.app, "POST", path, body):
                if isinstance(item, tuple):
                    is_sse = item[1].startswith("text/event-stream")
                    yield item
                elif is_sse:
                    out = stamper.feed(item)
                    if out:
                        yield out
                else:
                    parts.append(item)
            if is_sse:
                tail = stamper.flush()
                if tail:
                    yield tail
            elif parts:
                yield asgi.stamp_json(b"".join(parts), client_model, info)

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {"replica": self.replica_id, "status": "ok" if e.alive else "unavailable",
                "queue_depth": e.queue_depth, "running": e.running_count, "adapters": self.adapters.loaded,
                "models": sorted(self.adapters.held), "adapter_loads": self.adapters.loads,
                "adapter_unloads": self.adapters.unloads}


class LoraplexReplica:
    """The Ray Serve replica: a :class:`ReplicaCore` and its ``@serve.multiplexed`` adapter-set loader (made per
    instance, so ``max_num_models_per_replica`` comes from the settings)."""

    def __init__(self, settings: RaySettings) -> None:
        self.core = ReplicaCore(settings, serve.get_replica_context().replica_id.unique_id)
        adapters = self.core.adapters

        async def load_adapter_set(model_id: str) -> Any:
            return await adapters.hold(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)(
            load_adapter_set)

    async def handle(self, path: str, body: bytes, client_model: str | None,
                     extra: dict[str, Any]) -> tuple[int, str, bytes]:
        return await self.core.handle(serve.get_multiplexed_model_id(), self.get_model, path, body, client_model,
                                      extra)

    async def stream(self, path: str, body: bytes, client_model: str | None,
                     extra: dict[str, Any]) -> AsyncIterator[Any]:
        async for item in self.core.stream(serve.get_multiplexed_model_id(), self.get_model, path, body,
                                           client_model, extra):
            yield item

    def health(self) -> dict[str, Any]:
        return self.core.health()

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.engine.close(timeout=2.0)


# --------------------------------------------------------------------------- ingress
class IngressCore:
    """Name resolution at the ingress: the store as a catalog, the single-process registry rules, the router."""

    REFRESH_S = 2.0

    def __init__(self, settings: RaySettings) -> None:
        from loraplex.serve.registry import ModelRegistry

        self.settings = settings
        self.catalog = StoreCatalog(settings.store)
        self._refreshed = time.monotonic()
        self._route_lock = threading.Lock()
        router = settings.router
        if router is None and settings.router_dir:
            router = self._load_router(settings)
        self.registry = ModelRegistry(self.catalog, base_id=settings.base_id, compositions=settings.compositions,
                                      ab_splits=settings.ab_splits, router=router, seed=settings.seed)

    def _load_router(self, settings: RaySettings) -> Any:
        """A saved sequence router on a routing-only copy of the base (plus its experts, for the expert check)."""
        import loraplex
        from loraplex.compose.moe import RoutedModel
        from loraplex.compose.router import load_router

        plex = loraplex.load(settings.base, device=settings.device, trust_pickle=settings.trust_pickle)
        router = load_router(settings.router_dir, map_location=plex.device)
        for name in router.experts:
            plex.add_adapter(name, settings.store.path(name))
        self.catalog.tokenizer = plex.tokenizer
        self.catalog.device = plex.device
        return RoutedModel(plex, router)

    def refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self._refreshed > self.REFRESH_S:
            self.catalog.refresh()
            self._refreshed = time.monotonic()

    def resolve(self, model: str, prompt: str, user: str | None) -> Any:
        """The registry's :class:`Resolved` for ``model`` (rescanning the store once for a name not seen yet)."""
        self.refresh()
        with self._route_lock:  # a router's routing pass is not re-entrant
            try:
                return self.registry.resolve(model, prompt=prompt, user=user)
            except UnknownAdapterError:
                self.refresh(force=True)
                return self.registry.resolve(model, prompt=prompt, user=user)

    def route_text(self, path: str, body: dict[str, Any]) -> str:
        """The text a router sees (as the single-process server: the prompt, or the chat messages joined)."""
        if self.registry.router is None:
            return ""
        if path == "/v1/chat/completions":
            parts = []
            for m in body.get("messages") or []:
                c = m.get("content") if isinstance(m, dict) else None
                if isinstance(c, list):
                    c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
                parts.append(c if isinstance(c, str) else "")
            return "\n".join(parts)
        p = body.get("prompt")
        if isinstance(p, list) and p and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            return p
        tok = self.catalog.tokenizer
        if tok is not None and isinstance(p, list) and p:
            ids = p[0] if isinstance(p[0], list) else p
            return tok.decode(ids, skip_special_tokens=True)
        return ""


app = FastAPI(title="loraplex (Ray Serve)", docs_url=None, redoc_url=None)
install_error_handlers(app)  # the single-process server's OpenAI-shaped errors


@serve.ingress(app)
class LoraplexIngress:
    def __init__(self, replica: Any, settings: RaySettings) -> None:
        self.replica = replica
        self.core = IngressCore(settings)

    async def forward(self, request: Request, path: str) -> Any:
        body = await json_body(request)
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model: a model name (string) is required", "invalid_request", "model")
        text = self.core.route_text(path, body)
        user = body.get("user") if isinstance(body.get("user"), str) else None
        resolved = await anyio.to_thread.run_sync(lambda: self.core.resolve(model, text, user))
        mid = target(resolved)
        body["model"] = mid or self.core.settings.base_id
        extra: dict[str, Any] = {}
        if resolved.arm is not None:
            extra["arm"] = resolved.arm
        if model.strip() == "auto":
            extra["routed_to"] = body["model"]
        raw = json.dumps(body).encode()
        handle = self.replica.options(multiplexed_model_id=mid)
        if body.get("stream"):
            gen = handle.options(stream=True).stream.remote(path, raw, model, extra)
            status, ctype = await gen.__anext__()
            if not ctype.startswith("text/event-stream"):
                rest = b"".join([chunk async for chunk in gen])
                return Response(rest, status_code=status, media_type=ctype)

            async def pump() -> AsyncIterator[bytes]:
                async for chunk in gen:
                    yield chunk

            return StreamingResponse(pump(), status_code=status, media_type=ctype,
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        status, ctype, out = await handle.handle.remote(path, raw, model, extra)
        return Response(out, status_code=status, media_type=ctype)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self.forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self.forward(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(self) -> Any:
        self.core.refresh(force=True)
        return {"object": "list", "data": self.core.registry.list_models()}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(self, model_id: str) -> Any:
        self.core.refresh(force=True)
        for card in self.core.registry.list_models():
            if card["id"] == model_id:
                return card
        raise api_error(UnknownAdapterError(model_id, self.core.registry.known()))

    @app.get("/health")
    async def health(self) -> Any:
        try:
            rep = await self.replica.health.remote()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return JSONResponse({"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"},
                                status_code=503)
        ok = rep.get("status") == "ok"
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": self.core.settings.replicas,
                             "adapters_in_store": len(self.core.catalog.adapters), "replica": rep},
                            status_code=200 if ok else 503)

    @app.post("/v1/load_lora_adapter")
    @app.post("/v1/unload_lora_adapter")
    async def admin(self) -> Any:
        roots = ", ".join(self.core.settings.store.roots) or "(no store folder)"
        raise ApiError(501, f"with Ray Serve, adapters are not loaded by request: write the adapter folder into "
                            f"the adapter store ({roots}) and ask for it by name; replicas load it on first use",
                       "not_supported")



def build_app(settings: RaySettings) -> Any:
    """The Ray Serve application (pass it to ``serve.run``)."""
    replica = serve.deployment(LoraplexReplica, name=REPLICA,
                               num_replicas=settings.replicas, max_ongoing_requests=settings.max_ongoing_requests,
                               ray_actor_options={"num_cpus": settings.replica_cpus,
                                                  "num_gpus": settings.replica_gpus})
    ingress = serve.deployment(LoraplexIngress, name=INGRESS, max_ongoing_requests=4 * settings.max_ongoing_requests,
                               ray_actor_options={"num_cpus": settings.ingress_cpus})
    return ingress.bind(replica.bind(settings), settings)
