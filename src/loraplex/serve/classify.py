"""The encoder HTTP API: ``POST /v1/classify`` and ``POST /v1/embeddings`` over a multi-task encoder Plex.

``/v1/classify`` -- body ``{"model": adapter | composition spec | "auto", "input": str | [str], "top_k"?,
"truncate"?}``. Each input runs with the named adapter and its head (``auto``: the router picks per input) and
gets, for sequence tasks, ``label``, ``score`` and ``scores`` ({label: probability}, best first, ``top_k`` of them),
for token tasks ``entities`` ``[{label, text, start, end, score}]`` with character offsets into the input.
``x_loraplex.served_by`` lists, per input, the adapters that served it.

``/v1/embeddings`` -- OpenAI's shape; ``model`` is the base model's id or an adapter (or spec, or ``auto``);
embeddings are the encoder's last hidden state mean-pooled over the real tokens and L2-normalised.

Rows of concurrent requests (different adapters included) are batched by an
:class:`~loraplex.serve.encode.EncoderBatcher`: one mixed-adapter forward per batch. Errors use OpenAI's shape;
``/v1/models``, ``/health``, ``/metrics`` and the admin endpoints as in the completion server
(:mod:`loraplex.serve.http`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Mapping, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from loraplex.api import Plex
from loraplex.errors import AdapterError, LoraplexError
from loraplex.serve.encode import AUTO, EncoderBatcher, NoTaskHead, head_owner
from loraplex.serve.http import (MAX_BODY_BYTES, ApiError, api_error, install_admin_endpoints, install_info_endpoints,
                                 json_body, new_app, tokens_over_limit, until_disconnect, validate_body)
from loraplex.serve.labels import bio_entities, sequence_scores, word_tags
from loraplex.serve.registry import AUTO as AUTO_NAME
from loraplex.serve.registry import ModelRegistry
from loraplex.serve.schemas import RequestBody
from loraplex.tokens import encode_offsets, split_words


class ClassifyRequest(RequestBody):
    model: str
    input: str | list[str]
    top_k: int | None = Field(default=None, ge=1)
    truncate: bool = False
    user: str | None = None


class EmbeddingRequest(RequestBody):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    truncate: bool = False
    user: str | None = None


def classify_error(exc: BaseException) -> ApiError:
    """The HTTP answer to an exception of an encoder request."""
    if isinstance(exc, NoTaskHead):
        return ApiError(400, str(exc), "no_task_head", "model", adapters_with_heads=exc.with_heads)
    return api_error(exc)


def task_card(info: Any) -> dict[str, Any] | None:
    """``{"task", "labels"}`` of a :class:`~loraplex.tasks.TaskInfo` (None: no head)."""
    return None if info is None else {"task": info.task, "labels": list(info.labels)}


def create_classify_app(plex: Plex, *, router: Any = None, registry: ModelRegistry | None = None,
                        batcher: EncoderBatcher | None = None, base_id: str = "base", max_batch_size: int = 32,
                        batch_window_ms: float = 5.0, max_queue: int = 1024, max_length: int | None = None,
                        max_inputs: int = 256, compositions: Mapping[str, str] | None = None,
                        admin_token: str | None = None, adapter_roots: Sequence[str] = (),
                        unload_timeout: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over an encoder Plex (:func:`loraplex.tasks.load_encoder_plex`).

    ``router``: serves model ``auto`` (a :class:`~loraplex.compose.moe.RoutedModel`, an object with
    ``route_texts``, or a callable ``text -> (choice, served_by)``). ``max_length``: the most tokens per input
    (default: the model's ``max_position_embeddings``); longer inputs are a 400 unless the request sets
    ``truncate``. Without ``batcher`` the app starts its own (closed at the app's shutdown). ``admin_token`` and
    ``adapter_roots`` enable ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` as in the completion server
    (an adapter's task head comes and goes with it). ``max_body_bytes``: larger request bodies are answered 413;
    texts are tokenized on a worker thread, a long one checked on a prefix first."""
    if router is None:
        router = registry.router if registry is not None else batcher.router if batcher is not None else None
    owned = batcher is None
    if batcher is None:
        batcher = EncoderBatcher(plex, router=router, max_batch_size=max_batch_size,
                                 batch_window_ms=batch_window_ms, max_queue=max_queue)
    elif batcher.router is None:
        batcher.router = router
    registry = registry or ModelRegistry(plex, base_id=base_id, compositions=compositions, router=router)
    tokenizer = plex.tokenizer
    if tokenizer is None:
        raise LoraplexError("the encoder server needs the base model's tokenizer (plex.tokenizer is None)")
    cfg = getattr(plex.model, "config", None)
    limit = int(max_length or getattr(cfg, "max_position_embeddings", 0) or 512)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    metrics = batcher.metrics

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            batcher.close()

    app = new_app(title="loraplex-encoder", description="Multi-task encoder: classify, extract, embed",
                  metrics=metrics, max_body_bytes=max_body_bytes, lifespan=lifespan)
    app.state.batcher, app.state.registry = batcher, registry

    @app.exception_handler(NoTaskHead)
    async def _no_head(_: Request, exc: NoTaskHead) -> JSONResponse:
        return classify_error(exc).response()

    # ------------------------------------------------------------------ helpers
    def inputs_of(value: Any, what: str) -> list[Any]:
        items = [value] if isinstance(value, str) else list(value)
        if not items:
            raise ApiError(400, f"{what} must not be empty", "invalid_request", "input")
        if len(items) > max_inputs:
            raise ApiError(400, f"{len(items)} inputs in one request; this server accepts at most {max_inputs}",
                           "too_many_inputs", "input")
        return items

    # one tokenizer call at a time: a call with truncation changes the tokenizer's settings, which a concurrent
    # call on another thread must not see
    tokenizer_lock = threading.Lock()

    def too_long(i: int, n: str) -> ApiError:
        return ApiError(400, f"input[{i}] has {n} tokens; this server accepts at most {limit} tokens per input "
                             f"(max_length); send \"truncate\": true to cut longer inputs", "context_length_exceeded",
                        "input")

    def encode(text: str, i: int, truncate: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of one input (runs on a worker thread)."""
        with tokenizer_lock:
            if not truncate:
                over = tokens_over_limit(lambda s: len(tokenizer(s)["input_ids"]), text, limit)
                if over is not None:
                    raise too_long(i, f"more than {over}")
            ids, offsets = encode_offsets(tokenizer, text, limit if truncate else None)
        if len(ids) > limit:
            raise too_long(i, str(len(ids)))
        return ids, offsets

    async def encode_all(texts: Sequence[Any], truncate: bool) -> list[Any]:
        """:func:`encode` of each text input (None for token id lists), off the event loop."""
        return await anyio.to_thread.run_sync(
            lambda: [encode(t, i, truncate) if isinstance(t, str) else None for i, t in enumerate(texts)])

    def resolve(model: str, need_head: bool) -> tuple[Any, list[str]]:
        """(row choice or AUTO, served_by) of a model name; refuses a headless model for classification."""
        if model.strip() == AUTO_NAME:
            if router is None:
                registry.resolve(AUTO_NAME)  # raises the registry's "no router" error
            return AUTO, []
        res = registry.resolve(model)
        if need_head and head_owner(res.choice, batcher.heads) is None:
            names = res.served_by
            what = (f"adapter {names[0]!r}" if len(names) == 1 else f"model {model!r}" if names else
                    f"the base model {model!r}")
            raise classify_error(NoTaskHead(what, batcher.heads))
        return res.choice, list(res.served_by)

    async def run(request: Request, rows: list[tuple[list[int], Any, str, bool]]) -> list[Any]:
        """Every row's result; a client that hangs up first gets its queued rows skipped (not computed)."""
        try:
            futures = batcher.submit_many(rows)
        except LoraplexError as exc:
            raise classify_error(exc) from None
        try:
            return await until_disconnect(request, asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except ApiError:  # 499: the client is gone, nobody reads the answer
            metrics.cancelled_requests.inc()
            raise
        except LoraplexError as exc:
            raise classify_error(exc) from None
        finally:
            for f in futures:
                f.cancel()  # rows not started yet are skipped (a request fails as a whole)

    def count(counter: Any, names: Sequence[str]) -> None:
        for n in names or ["base"]:
            counter.inc(adapter=n)

    # ------------------------------------------------------------------ endpoints
    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        req = validate_body(ClassifyRequest, await json_body(request))
        texts = inputs_of(req.input, "input")
        choice, _ = await anyio.to_thread.run_sync(resolve, req.model, True)  # may read a store adapter's meta
        encoded = await encode_all(texts, req.truncate)
        results = await run(request, [(ids, choice, t, True) for (ids, _), t in zip(encoded, texts)])
        heads = batcher.heads
        data, served, n_tokens = [], [], 0
        for i, (text, (ids, offsets), res) in enumerate(zip(texts, encoded, results)):
            n_tokens += len(ids)
            info = heads.get(res.head)
            if info is None or res.logits is None:  # the adapter was replaced by a headless one meanwhile
                raise classify_error(NoTaskHead(f"adapter {res.head!r}", heads))
            item: dict[str, Any] = {"object": "classification", "index": i, "task": info.task, "head": res.head}
            if info.task == "classification":
                label, score, scores = sequence_scores(res.logits, info.labels, req.top_k)
                item.update(label=label, score=score, scores=scores)
            else:
                words = split_words(text)
                item["entities"] = bio_entities(text, words, word_tags(res.logits, offsets, words, info.labels))
            item["served_by"] = res.served_by
            data.append(item)
            served.append(res.served_by)
            count(metrics.classify_inputs, res.served_by)
        for n in dict.fromkeys(n for s in served for n in (s or ["base"])):
            metrics.classify_requests.inc(adapter=n)
        return JSONResponse({"id": "classify-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
                             "model": req.model, "data": data,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                             "x_loraplex": {"served_by": served}})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        req = validate_body(EmbeddingRequest, await json_body(request))
        if req.dimensions is not None and req.dimensions != hidden:
            raise ApiError(400, f"dimensions={req.dimensions} is not supported: this model's embeddings have "
                                f"{hidden} dimensions", "unsupported_parameter", "dimensions")
        items = inputs_of(req.input, "input")
        if all(isinstance(x, int) for x in items):  # one token id list
            items = [items]
        choice, _ = resolve(req.model, need_head=False)
        encoded = await encode_all(items, req.truncate)
        rows = []
        for i, x in enumerate(items):
            if isinstance(x, str):
                ids, text = encoded[i][0], x
            else:
                ids = [int(t) for t in x]
                bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
                if not ids or bad:
                    raise ApiError(400, f"input[{i}]: " + (f"token id {bad[0]} is outside the vocabulary "
                                                          f"(0..{vocab - 1})" if bad else "empty token list"),
                                   "invalid_token", "input")
                if len(ids) > limit:
                    if not req.truncate:
                        raise ApiError(400, f"input[{i}] has {len(ids)} tokens; this server accepts at most {limit} "
                                            f"tokens per input (max_length); send \"truncate\": true to cut longer "
                                            f"inputs", "context_length_exceeded", "input")
                    ids = ids[:limit]
                text = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append((ids, choice, text, False))
        results = await run(request, rows)
        data = []
        for i, res in enumerate(results):
            vec = res.embedding.numpy().astype("<f4")
            emb: Any = base64.b64encode(vec.tobytes()).decode() if req.encoding_format == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        served = [r.served_by for r in results]
        for n in dict.fromkeys(n for s in served for n in (s or ["base"])):
            metrics.embedding_requests.inc(adapter=n)
        n_tokens = sum(len(r[0]) for r in rows)
        return JSONResponse({"object": "list", "data": data, "model": req.model,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                             "x_loraplex": {"served_by": served}})

    def cards(**page: Any) -> list[dict[str, Any]]:
        heads = batcher.heads
        out = []
        for card in registry.list_models(**page):
            if card["x_loraplex_kind"] in ("adapter", "merge"):
                try:
                    card["x_loraplex_task"] = task_card(heads.get(card["id"]))
                except AdapterError:  # a store adapter with an invalid meta: its requests say why
                    card["x_loraplex_task"] = None
            out.append(card)
        return out

    install_info_endpoints(
        app, cards=cards, known=registry.known, worker=batcher, metrics=metrics, count=registry.adapter_count,
        health=lambda: {"queue_depth": batcher.queue_depth, "running": batcher.running_count,
                        "adapters": len(plex.adapters), "heads": len(batcher.heads), "max_length": limit})

    # ------------------------------------------------------------------ admin endpoints
    # the worker runs the change between two forwards, so no batch ever sees half an adapter; rows already queued
    # for an unloaded adapter fail with 404 (encoder rows are one forward: there is nothing long-running to drain)
    install_admin_endpoints(
        app, admin_token=admin_token, roots=[str(r) for r in adapter_roots], registry=registry, plex=plex,
        metrics=metrics, unload_timeout=unload_timeout,
        register=lambda name, adapter, replace: batcher.call_on_worker(
            lambda: plex.add_adapter(name, adapter, replace=replace), timeout=unload_timeout),
        unload=lambda name, timeout: batcher.call_on_worker(lambda: plex.remove_adapter(name, timeout=timeout),
                                                            timeout=timeout))
    return app


# --------------------------------------------------------------------------- building a server
def is_encoder_base(path: str | os.PathLike) -> bool:
    """Whether a model folder holds an encoder (no causal LM / seq2seq architecture), served by the classify app."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - not readable here: the generation server's loader reports why
        return False
    archs = cfg.architectures or []
    generative = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    return not (generative or getattr(cfg, "is_decoder", False) or getattr(cfg, "is_encoder_decoder", False))


def build_classify_server(*, base: str, adapters: Mapping[str, str] | None = None, adapters_dir: str | None = None,
                          router: Any = None, router_dir: str | None = None, base_id: str | None = None,
                          compositions: Mapping[str, str] | None = None, device: str | None = None,
                          max_slots: int = 32, trust_pickle: bool = False, max_batch_size: int = 32,
                          batch_window_ms: float = 5.0, max_queue: int = 1024, max_length: int | None = None,
                          plex: Plex | None = None, admin_token: str | None = None, adapter_roots: Sequence[str] = (),
                          cpu_budget_mb: float | None = None, rescan_seconds: float = 5.0,
                          threads: int | None = None
                          ) -> tuple[EncoderBatcher, ModelRegistry, FastAPI]:
    """(batcher, registry, app) for an encoder base and adapters with heads; ``router_dir``: a saved sequence
    router, served as model ``auto``. An adapter whose labels do not fit its head fails here (AdapterError).
    ``admin_token``: enables the admin load/unload endpoints, reading under ``adapter_roots`` (default:
    ``adapters_dir``). ``adapters_dir`` is an adapter store (:mod:`loraplex.adapters.store`), served as the
    completion server serves one: names indexed at start-up, each adapter (and its task head, whose task and
    labels its ``loraplex_meta.json`` declares) read on its first request off the worker thread, kept in the CPU
    tier under ``cpu_budget_mb`` (LRU, re-read when needed), rescanned every ``rescan_seconds`` (0: only on
    requests for unknown names); an invalid adapter fails its requests with a 400 naming it."""
    from loraplex.adapters.store import AdapterStore
    from loraplex.tasks import load_encoder_plex

    if plex is None:
        plex = load_encoder_plex(base, device=device, max_slots=max_slots, trust_pickle=trust_pickle,
                                 cpu_budget_bytes=int(cpu_budget_mb * 2**20) if cpu_budget_mb else None)
    if adapters_dir:
        store = AdapterStore(adapters_dir, trust_pickle=trust_pickle, confine_to=adapter_roots)
        if not len(store):
            raise AdapterError(f"{adapters_dir}: no adapter here (adapter_config.json in it or in a subfolder)")
        plex.attach_store(store)
        store.watch(rescan_seconds)
    for name, path in (adapters or {}).items():
        plex.add_adapter(name, path)
    if router_dir and router is None:
        from loraplex.compose.moe import RoutedModel
        from loraplex.compose.router import load_router

        router = RoutedModel(plex, load_router(router_dir, map_location=plex.device))
    batcher = EncoderBatcher(plex, router=router, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                             max_queue=max_queue, threads=threads)
    bid = base_id or Path(str(base)).name or "base"
    registry = ModelRegistry(plex, base_id=bid, compositions=compositions, router=router)
    roots = list(adapter_roots) or ([adapters_dir] if adapters_dir else [])
    app = create_classify_app(plex, registry=registry, batcher=batcher, router=router, base_id=bid,
                              max_length=max_length, admin_token=admin_token, adapter_roots=roots)
    return batcher, registry, app


def build_classify_from_config(path: str | os.PathLike, **kw: Any) -> tuple[EncoderBatcher, ModelRegistry, FastAPI]:
    """(batcher, registry, app) from a ``model_type: encoder`` training config: the trained adapters (and merges)
    of its ``output_dir``, and its trained router (``<output_dir>/router``) as model ``auto`` when present."""
    from loraplex.config import load_config
    from loraplex.run import TrainedRun, load_trained_plex

    config = load_config(path)
    if config.model_type != "encoder":
        raise LoraplexError(f"{path}: model_type is {config.model_type!r}; the classify server needs "
                            f"model_type: encoder")
    run = TrainedRun.of(config)
    plex = load_trained_plex(config, run.root, device=kw.pop("device", None))
    return build_classify_server(base=str(config.base_model), plex=plex, base_id=kw.pop("base_id", None),
                                 router_dir=str(run.router_dir) if run.has_router() else None, **kw)


def config_is_encoder(path: str | os.PathLike) -> bool:
    """Whether a YAML config says ``model_type: encoder`` (read without validating the rest)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "encoder"


__all__ = ["ClassifyRequest", "EmbeddingRequest", "build_classify_from_config", "build_classify_server",
           "classify_error", "config_is_encoder", "create_classify_app", "is_encoder_base"]
