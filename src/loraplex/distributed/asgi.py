"""Run one HTTP request through an ASGI app in-process (a replica's single-process loraplex app), and stamp the
replies: the ``model`` the client asked for and the ``x_loraplex`` block (replica id, multiplexed model id, ...)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Mapping

from loraplex.serve.http import api_error

log = logging.getLogger("loraplex.distributed")


async def call(app: Any, method: str, path: str, body: bytes = b"",
               headers: Mapping[str, str] | None = None) -> AsyncIterator[Any]:
    """Yield ``(status, content_type)`` first, then the body's chunks as they are sent.

    The app sees a client that stays connected until this generator is closed (e.g. the caller gave up), at
    which point it sees a disconnect, so the loraplex app cancels the generation. An app that crashes answers
    through the shared error handlers (:mod:`loraplex.serve.http`): its JSON 500 when it sent one, else the
    OpenAI-shaped error of the exception."""
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": hdrs, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while True:
            msg = await out.get()
            if msg is None:
                break
            if msg["type"] == "http.response.start":
                started = True
                ctype = next((v.decode("latin-1") for k, v in msg.get("headers", []) if k.lower() == b"content-type"),
                             "application/json")
                yield int(msg["status"]), ctype
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
        try:
            await task
        except Exception as exc:  # noqa: BLE001 - answered as the single-process server answers it
            if started:
                log.error("%s %s failed after its answer started", method, path, exc_info=exc)
            else:
                err = api_error(exc)
                yield err.status, "application/json"
                yield json.dumps(err.body()).encode()
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 5.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - best effort on the way out
                task.cancel()


def stamp(obj: Any, model: str | None, info: Mapping[str, Any]) -> Any:
    """``obj`` (a response or chunk object) with ``model`` restored and ``info`` merged into ``x_loraplex``."""
    if not isinstance(obj, dict):
        return obj
    if model is not None and "model" in obj:
        obj["model"] = model
    x = obj.get("x_loraplex")
    obj["x_loraplex"] = {**(x if isinstance(x, dict) else {}), **info}
    return obj


def stamp_json(body: bytes, model: str | None, info: Mapping[str, Any]) -> bytes:
    """A JSON body with :func:`stamp` applied (left as is if it is not JSON)."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body
    return json.dumps(stamp(obj, model, info), ensure_ascii=False).encode()


class SSEStamper:
    """Feeds server-sent-event bytes through, applying :func:`stamp` to each ``data: {json}`` event."""

    def __init__(self, model: str | None, info: Mapping[str, Any]) -> None:
        self.model, self.info, self._buf = model, info, b""

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        *events, self._buf = self._buf.split(b"\n\n")
        return b"".join(self._one(e) + b"\n\n" for e in events)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return self._one(rest) if rest else b""

    def _one(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event.strip() == b"data: [DONE]":
            return event
        try:
            obj = json.loads(event[6:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return event
        return b"data: " + json.dumps(stamp(obj, self.model, self.info), ensure_ascii=False).encode()
