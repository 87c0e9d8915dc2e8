"""The OpenAI-compatible HTTP API over an :class:`~loraplex.serve.engine.Engine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming with SSE or not), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text), and the admin endpoints ``POST /v1/load_lora_adapter`` /
``POST /v1/unload_lora_adapter`` (``Authorization: Bearer <admin token>``; paths confined to the adapter roots).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a response says which adapters
served it in ``x_loraplex: {"served_by": [...], "arm": ...}``. Errors, body limits, metering and the info and admin
endpoints come from :mod:`loraplex.serve.http` (shared with the encoder app).

A ``model`` such as ``merge(ties;a=0.7,b=0.3;density=0.7)``, or a composition defined as one, is served by a merged
adapter built once per spec by the app's :class:`~loraplex.serve.merges.MergeCache` (off the engine's worker; the
first request awaits it, the others keep flowing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.errors import UnknownAdapterError
from loraplex.serve import schemas
from loraplex.serve.defaults import ServeDefaults
from loraplex.serve.detok import text_offsets
from loraplex.serve.engine import Delta, Engine, Final, RequestHandle, RequestTooLarge
from loraplex.serve.http import (MAX_BODY_BYTES, ApiError, api_error, install_admin_endpoints, install_info_endpoints,
                                 json_body, new_app, tokens_over_limit, until_disconnect, validate_body)
from loraplex.serve.logprobs import chat_logprobs, completion_logprobs
from loraplex.serve.merges import MergeCache
from loraplex.serve.registry import ModelRegistry, Resolved, parse_merge
from loraplex.serve.sampling import SamplingParams


def create_app(engine: Engine, registry: ModelRegistry | None = None, *, admin_token: str | None = None,
               adapter_roots: Sequence[str] = (), base_id: str = "base", max_choices: int = 16,
               unload_timeout: float = 30.0, add_special_tokens: bool = True,
               max_body_bytes: int = MAX_BODY_BYTES, max_merges: int = 8,
               defaults: ServeDefaults | None = None) -> FastAPI:
    """The FastAPI app. ``registry`` defaults to one with just the base model and the registered adapters.

    ``defaults``: request defaults and prompt templates of a trained config (:mod:`loraplex.serve.defaults`).

    ``max_body_bytes``: larger request bodies are answered 413. Prompts are tokenized on a worker thread, a long one
    checked on a prefix first (:func:`~loraplex.serve.http.tokens_over_limit`), so no request stalls the others.
    ``max_merges``: per-request merges kept registered (LRU past it); merges of the registry's compositions are
    started at once and never evicted."""
    registry = registry or ModelRegistry(engine.plex, base_id=base_id)
    defaults = defaults or ServeDefaults()
    tokenizer = engine.tokenizer
    vocab = int(getattr(getattr(engine.model, "config", None), "vocab_size", 0) or 0)
    roots = [str(r) for r in adapter_roots]
    metrics = engine.metrics

    app = new_app(title="loraplex", description="OpenAI-compatible multi-LoRA server", metrics=metrics,
                  max_body_bytes=max_body_bytes)
    app.state.engine, app.state.registry = engine, registry
    merges = MergeCache(engine, max_entries=max_merges, metrics=metrics)
    app.state.merges = merges
    registry.serves_merges = True
    for spec in registry.compositions.values():  # configured merges: built now, in the background, and pinned
        node = parse_merge(spec)
        if node is not None:
            merges.start(node, pinned=True)

    # ------------------------------------------------------------------ helpers
    def encode(text: str, special: bool) -> list[int]:
        """Token ids of a prompt (runs on a worker thread); a too-long prompt is refused on a prefix first."""
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", "no_tokenizer")
        limit = engine.max_prompt_tokens
        over = tokens_over_limit(lambda s: len(tokenizer(s, add_special_tokens=special)["input_ids"]), text, limit)
        if over is not None:
            raise RequestTooLarge(f"the prompt has more than {over} tokens; this server accepts at most {limit}",
                                  "prompt_too_long")
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    async def encode_all(texts: list[str], special: bool) -> list[list[int]]:
        return await anyio.to_thread.run_sync(lambda: [encode(t, special) for t in texts])

    def check_choices(n_prompts: int, n: int) -> None:
        if n_prompts * n > max_choices:
            raise ApiError(400, f"{n_prompts} prompt(s) x n={n} is more than this server's limit of "
                                f"{max_choices} choices per request", "too_many_choices", "n")

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
            resolved = await anyio.to_thread.run_sync(lambda: registry.resolve(model, prompt=prompt, user=user))
        else:
            resolved = registry.resolve(model, prompt=prompt, user=user)
        return await built(resolved)

    async def built(resolved: Resolved) -> Resolved:
        """``resolved`` with a merge it names built and registered (awaited: the event loop keeps serving)."""
        if resolved.merge is None:
            return resolved
        return dataclasses.replace(resolved, choice=await merges.ensure(resolved.merge))

    def check_request(req: Any) -> None:
        """400 for a field the server does not implement, or fields that contradict each other."""
        bad = req.unsupported()
        if bad:
            raise ApiError(400, f"parameter {bad!r} is not supported by this server", "unsupported_parameter", bad)
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", "invalid_request",
                           "stream_options")
        if getattr(req, "top_logprobs", None) is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "invalid_request", "top_logprobs")
        if len(req.stop_list()) > 16:
            raise ApiError(400, "at most 16 stop sequences are allowed", "invalid_request", "stop")
        bad_ids = [t for t in (req.stop_token_ids or []) if t < 0 or (vocab and t >= vocab)]
        if bad_ids:
            raise ApiError(400, f"stop_token_ids: token id {bad_ids[0]} is outside the vocabulary (0..{vocab - 1})",
                           "invalid_token", "stop_token_ids")

    def sampling(req: Any, max_tokens: int, j: int) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                stop=tuple(req.stop_list()), seed=None if req.seed is None else req.seed + j,
                ignore_eos=req.ignore_eos, stop_token_ids=tuple(req.stop_token_ids or ()),
                top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                min_tokens=req.min_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
                logprobs=req.top_logprobs_count(), prompt_logprobs=req.echo_logprobs())
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_request") from None

    def submit_now(prompts: list[list[int]], resolved: Resolved, req: Any, max_tokens: Any) -> list[RequestHandle]:
        check_choices(len(prompts), req.n)
        items = []
        for ids in prompts:
            check_ids(ids)
            mt = max_tokens(ids) if callable(max_tokens) else max_tokens
            for j in range(req.n):
                items.append((ids, resolved.choice, sampling(req, mt, j)))
        return engine.submit_many(items)

    async def submit(prompts: list[list[int]], resolved: Resolved, req: Any, max_tokens: Any) -> list[RequestHandle]:
        try:
            return submit_now(prompts, resolved, req, max_tokens)
        except UnknownAdapterError:
            if resolved.merge is None:
                raise
        # the merge left the bank between resolving and queueing (evicted): build it again, once
        merges.discard(resolved.choice)
        return submit_now(prompts, await built(dataclasses.replace(resolved, choice=None)), req, max_tokens)

    def chat_default_max(ids: list[int]) -> int:
        room = (engine.context_length - len(ids)) if engine.context_length else engine.max_tokens_cap
        return max(1, min(engine.max_tokens_cap, room))

    # ------------------------------------------------------------------ generation endpoints
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await json_body(request)
        req = defaults.apply(validate_body(schemas.CompletionRequest, body), body, chat=False)
        check_request(req)
        p = req.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            check_choices(len(p), req.n)  # before tokenizing 10,000 prompts
        if isinstance(p, str):
            prompts, first_text = await encode_all([p], add_special_tokens), p
        elif p and all(isinstance(x, str) for x in p):
            prompts, first_text = await encode_all(list(p), add_special_tokens), p[0]
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
        texts = [p] if isinstance(p, str) else list(p) if p and isinstance(p[0], str) else None
        if texts is not None and defaults.templated(resolved.served_by):  # the adapter's prompt template
            texts = [defaults.prompt(resolved.served_by, t) for t in texts]
            prompts = await encode_all(texts, add_special_tokens)
        handles = await submit(prompts, resolved, req, req.max_tokens)
        echo = None
        if req.echo:  # the prompt's text, as sent (or decoded from its ids), before each choice's text
            echo = texts if texts is not None else [decode(ids) for ids in prompts]
        return await respond(request, "text_completion", req, resolved, handles, prompts, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await json_body(request)
        req = defaults.apply(validate_body(schemas.ChatCompletionRequest, body), body, chat=True)
        check_request(req)
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

        def render_and_encode() -> list[list[int]]:
            try:
                text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                     tokenize=False)
            except Exception as exc:  # noqa: BLE001 - a template may reject a conversation (e.g. role order)
                raise ApiError(400, f"the chat template rejected these messages: {exc}", "invalid_messages",
                               "messages") from None
            return [encode(text, False)]

        prompts = await anyio.to_thread.run_sync(render_and_encode)
        max_tokens = req.max_completion_tokens or req.max_tokens or chat_default_max
        handles = await submit(prompts, resolved, req, max_tokens)
        return await respond(request, "chat.completion", req, resolved, handles, prompts)

    token_texts: dict[int, str] = {}

    def token_text(token_id: int) -> str:
        """A token's own text, as logprobs name it."""
        t = token_texts.get(token_id)
        if t is None:
            t = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
            if len(token_texts) < 200_000:
                token_texts[token_id] = t
        return t

    def echo_logprobs(scored: list | None, ids: list[int], n_top: int) -> dict[str, Any]:
        """The prompt's part of an echoed completion's logprobs (text offsets into the decoded prompt)."""
        entries = list(scored or [None] * len(ids))
        for e, off in zip(entries, text_offsets(tokenizer, ids)):
            if e is not None:
                e.offset = off
        return completion_logprobs(entries, token_text, n_top)

    def joined(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {k: a[k] + b[k] for k in a}

    async def respond(request: Request, kind: str, req: Any, resolved: Resolved, handles: list[RequestHandle],
                      prompts: list[list[int]], echo: list[str] | None = None) -> Any:
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        n_prompt = sum(len(p) for p in prompts)
        info = resolved.info()
        n_top = req.top_logprobs_count()
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            shape = echo_shape = None
            if n_top is not None and kind == "chat.completion":
                def shape(i: int, entries: list) -> Any:
                    return chat_logprobs(entries, token_text, n_top)
            elif n_top is not None:
                def shape(i: int, entries: list) -> Any:
                    return completion_logprobs(entries, token_text, n_top, len(echo[i // req.n]) if echo else 0)

                if echo is not None:
                    def echo_shape(i: int) -> Any:
                        return echo_logprobs(handles[i].prompt_logprobs, prompts[i // req.n], n_top)
            return StreamingResponse(
                _sse(handles, kind, rid, created, req.model, info, n_prompt, include_usage, shape, echo, echo_shape,
                     req.n),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = await _wait(request, handles)
        for f in finals:
            if f.error is not None:
                raise api_error(f.error)
        choices = []
        for i, f in enumerate(finals):
            if kind == "chat.completion":
                lp = None if n_top is None else chat_logprobs(f.logprobs or [], token_text, n_top)
                choices.append({"index": i, "message": {"role": "assistant", "content": f.text},
                                "finish_reason": f.finish_reason, "logprobs": lp})
                continue
            text, base = f.text, 0
            if echo is not None:
                text, base = echo[i // req.n] + f.text, len(echo[i // req.n])
            lp = None
            if n_top is not None:
                lp = completion_logprobs(f.logprobs or [], token_text, n_top, base)
                if echo is not None:
                    lp = joined(await anyio.to_thread.run_sync(
                        lambda: echo_logprobs(f.prompt_logprobs, prompts[i // req.n], n_top)), lp)
            choices.append({"index": i, "text": text, "finish_reason": f.finish_reason, "logprobs": lp})
        n_completion = sum(f.completion_tokens for f in finals)
        return JSONResponse({
            "id": rid, "object": kind, "created": created, "model": req.model, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion},
            "x_loraplex": info,
        })

    # ------------------------------------------------------------------ info endpoints
    install_info_endpoints(
        app, cards=registry.list_models, known=registry.known, worker=engine, metrics=metrics,
        count=registry.adapter_count,
        health=lambda: {"queue_depth": engine.queue_depth, "running": engine.running_count,
                        "adapters": len(engine.plex.adapters), "resident": len(engine.plex.resident())})

    # ------------------------------------------------------------------ admin endpoints
    def register(name: str, adapter: Any, replace: bool) -> None:
        engine.register_adapter(name, adapter, replace=replace, timeout=unload_timeout)
        merges.forget_sources([name])  # merges built from the old weights

    def unload(name: str, timeout: float) -> None:
        engine.unload_adapter(name, timeout=timeout)
        merges.forget_sources([name])

    install_admin_endpoints(
        app, admin_token=admin_token, roots=roots, registry=registry, plex=engine.plex, metrics=metrics,
        register=register, unload=unload, unload_timeout=unload_timeout, merges=merges)

    return app


# --------------------------------------------------------------------------- waiting and streaming
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
               n_prompt: int, include_usage: bool, shape: Callable[[int, list], Any] | None = None,
               echo: list[str] | None = None, echo_shape: Callable[[int], Any] | None = None,
               n: int = 1) -> AsyncIterator[str]:
    """The SSE stream of a request. ``shape(choice, entries)``: a chunk's logprobs object for these token
    logprobs (None: logprobs off); ``echo``: each prompt's text, sent first (completions), with the prompt's
    logprobs ``echo_shape(choice)``."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None, role: bool = False, lp: Any = None) -> dict:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": lp}
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                "x_loraplex": info}

    completion = 0
    sent = [0] * len(handles)  # logprob entries sent per choice
    echoed = [echo is None] * len(handles)
    try:
        if chat:
            for i in range(len(handles)):
                yield _sse_line(chunk(i, "", None, role=True))
        async for i, ev in _events(handles):
            if not echoed[i] and (isinstance(ev, Delta) or ev.error is None):
                echoed[i] = True  # the prompt's text (and logprobs) first, once the prompt was scored
                plp = await anyio.to_thread.run_sync(echo_shape, i) if echo_shape is not None else None
                yield _sse_line(chunk(i, echo[i // n], None, lp=plp))  # type: ignore[index]
            if isinstance(ev, Delta):
                lp = None
                if shape is not None and ev.logprobs:
                    lp = shape(i, ev.logprobs)
                    sent[i] += len(ev.logprobs)
                yield _sse_line(chunk(i, ev.text, None, lp=lp))
            elif ev.error is not None:
                err = api_error(ev.error)
                yield _sse_line(schemas.error_body(err.status, err.message, err.code, err.param, **err.extra))
            else:
                completion += ev.completion_tokens
                lp = None
                rest = (ev.logprobs or [])[sent[i]:]
                if shape is not None and rest:
                    lp = shape(i, rest)
                yield _sse_line(chunk(i, None if chat else "", ev.finish_reason, lp=lp))
        if include_usage:
            yield _sse_line({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion,
                                       "total_tokens": n_prompt + completion}, "x_loraplex": info})
        yield "data: [DONE]\n\n"
    finally:  # client gone (or done): stop whatever still runs
        for h in handles:
            if not h.done:
                h.cancel()


__all__ = ["create_app"]
