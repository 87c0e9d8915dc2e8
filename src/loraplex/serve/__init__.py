"""OpenAI-compatible multi-LoRA serving: continuous mixed-adapter batching, adapter cache, admin loads.

    from loraplex.serve import Engine, ModelRegistry, create_app, ServerThread
    engine = Engine(plex, max_batch_size=16, batch_window_ms=5)
    app = create_app(engine, ModelRegistry(plex, compositions={"mix": "blend(a=0.7,b=0.3)"}),
                     admin_token="...", adapter_roots=["/srv/adapters"])

Encoders (adapters with task heads, :mod:`loraplex.tasks`): ``create_classify_app(plex, router=...)`` serves
``/v1/classify`` and ``/v1/embeddings`` with the same batching, errors and metrics (:mod:`loraplex.serve.classify`).
"""

from loraplex.serve.engine import (AdapterBusy, AdapterUnavailable, Delta, Engine, EngineClosed, EngineError, Final,
                                   QueueFull, RequestHandle, RequestTooLarge)
from loraplex.serve.registry import ModelRegistry, Resolved, ResolveError, parse_spec
from loraplex.serve.sampling import SamplingParams

__all__ = [
    "AdapterBusy", "AdapterUnavailable", "Delta", "Engine", "EngineClosed", "EngineError", "Final", "ModelRegistry",
    "QueueFull", "RequestHandle", "RequestTooLarge", "ResolveError", "Resolved", "SamplingParams", "ServerThread",
    "create_app", "create_classify_app", "parse_spec",
]


def __getattr__(name: str):  # the HTTP layer imports fastapi/uvicorn: load it on first use
    if name == "create_app":
        from loraplex.serve.app import create_app

        return create_app
    if name == "create_classify_app":
        from loraplex.serve.classify import create_classify_app

        return create_classify_app
    if name == "ServerThread":
        from loraplex.serve.server import ServerThread

        return ServerThread
    raise AttributeError(name)
