"""``loraplex serve``: build the engine, model registry and app from command-line options (or a config), run uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import typer

from loraplex.config import load_config
from loraplex.errors import LoraplexError
from loraplex.run import serve_arguments


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise typer.BadParameter(f"{what} must look like NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def parse_ab(items: Sequence[str]) -> dict[str, dict[str, float]]:
    """``exp=a:0.5,b:0.5`` -> {exp: {a: 0.5, b: 0.5}}."""
    out: dict[str, dict[str, float]] = {}
    for name, arms in _pairs(items, "--ab").items():
        split: dict[str, float] = {}
        for arm in arms.split(","):
            a, colon, w = arm.partition(":")
            try:
                split[a.strip()] = float(w) if colon else 1.0
            except ValueError:
                raise typer.BadParameter(f"--ab {name}: weight {w!r} of arm {a!r} is not a number") from None
        out[name] = split
    return out


def build_server(*, base: str, adapters: Mapping[str, str] | None = None, adapters_dir: str | None = None,
                 admin_token: str | None = None, adapter_roots: Sequence[str] = (),
                 compositions: Mapping[str, str] | None = None,
                 ab_splits: Mapping[str, Mapping[str, float]] | None = None, router: Any = None,
                 router_dir: str | None = None, base_id: str | None = None, device: str | None = None,
                 dtype: str | None = None, max_slots: int = 32, cpu_budget_mb: float | None = None,
                 trust_pickle: bool = False, quantize: str | None = None,
                 max_batch_size: int = 16, batch_window_ms: float = 5.0, max_queue: int = 256,
                 max_prompt_tokens: int | None = None, max_tokens_cap: int | None = None, seed: int = 0,
                 rescan_seconds: float = 5.0, max_skips: int = 8, generation: Mapping[str, Any] | None = None,
                 prompt_templates: Mapping[str, tuple[str, str]] | None = None, threads: int | None = None) -> Any:
    """(engine, registry, app) for a base model and adapters; shared by the CLI and the config hook.

    ``adapters_dir`` is an adapter store (:mod:`loraplex.adapters.store`): indexed at start-up, each adapter read
    on its first request (off the serving thread), rescanned every ``rescan_seconds`` (0: only on requests for
    unknown names). ``router`` is a router object (see :class:`~loraplex.serve.registry.ModelRegistry`), or
    ``router_dir`` a saved sequence router, served as model ``auto``. Admin loads are confined to
    ``adapter_roots`` (default: ``adapters_dir``); without ``admin_token`` the admin endpoints are disabled.
    ``generation`` (a config's ``generation`` block) sets request defaults and ``prompt_templates`` maps an
    adapter to its (template, input column) (:mod:`loraplex.serve.defaults`). ``quantize`` ("int8" / "int4"): the
    base's weight-only quantization (:mod:`loraplex.quant`). ``threads``: the engine worker's intra-op threads
    (default: the calling thread's; :mod:`loraplex.cputhreads`)."""
    import torch

    import loraplex
    from loraplex.adapters.store import AdapterStore
    from loraplex.serve.app import create_app
    from loraplex.serve.defaults import PromptTemplate, ServeDefaults
    from loraplex.serve.engine import Engine
    from loraplex.serve.registry import ModelRegistry

    plex = loraplex.load(base, device=device, dtype=getattr(torch, dtype) if dtype else None, max_slots=max_slots,
                         cpu_budget_bytes=int(cpu_budget_mb * 2**20) if cpu_budget_mb else None,
                         trust_pickle=trust_pickle, quantize=quantize)
    store = None
    if adapters_dir:
        store = AdapterStore(adapters_dir, trust_pickle=trust_pickle, confine_to=adapter_roots)
        plex.attach_store(store)
        store.watch(rescan_seconds)
    for name, path in (adapters or {}).items():
        plex.add_adapter(name, path)
    if router_dir and router is None:  # a trained sequence router (loraplex route / train): serves model "auto"
        from loraplex.compose.moe import RoutedModel
        from loraplex.compose.router import load_router

        router = RoutedModel(plex, load_router(router_dir, map_location=plex.device))
    engine = Engine(plex, max_batch_size=max_batch_size, batch_window_ms=batch_window_ms, max_queue=max_queue,
                    max_prompt_tokens=max_prompt_tokens, max_tokens_cap=max_tokens_cap, max_skips=max_skips,
                    threads=threads)
    bid = base_id or Path(str(base)).name or "base"
    registry = ModelRegistry(plex, base_id=bid, compositions=compositions, ab_splits=ab_splits, router=router,
                             seed=seed)
    roots = list(adapter_roots) or ([adapters_dir] if adapters_dir else [])
    log = logging.getLogger("loraplex.serve")
    templates: dict[str, PromptTemplate] = {}
    for name, (template, column) in (prompt_templates or {}).items():
        try:
            templates[name] = PromptTemplate(template, column)
        except LoraplexError as exc:
            log.warning("adapter %r: %s; its completion prompts are sent as given", name, exc)
    defaults = ServeDefaults(dict(generation or {}), templates)
    if defaults.ignored:
        log.warning("generation keys not applied by the server: %s", ", ".join(defaults.ignored))
    app = create_app(engine, registry, admin_token=admin_token, adapter_roots=roots, base_id=bid,
                     defaults=defaults)
    return engine, registry, app


def build_engine_from_config(path: str | os.PathLike, **options: Any) -> Any:
    """(engine, registry, app) over the trained run of a loraplex YAML config (:func:`loraplex.run.serve_arguments`);
    ``options`` (e.g. ``admin_token``, ``adapter_roots``) are passed on to :func:`build_server`."""
    from loraplex.serve.classify import build_classify_from_config, config_is_encoder

    if config_is_encoder(path):  # a multi-task encoder: the classify/embeddings server over its trained output
        return build_classify_from_config(path, **options)
    return build_server(**{**serve_arguments(load_config(path)), **options})


def serve(
    config: Optional[Path] = typer.Argument(None, help="A loraplex YAML config (instead of --base/--adapter)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model folder or hub id."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH of an adapter folder (repeatable)."),
    adapters_dir: Optional[str] = typer.Option(None, "--adapters-dir",
                                               help="Folder whose subfolders are adapters (named after them)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port"),
    admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="LORAPLEX_ADMIN_TOKEN",
                                              help="Bearer token for /v1/load_lora_adapter and "
                                                   "/v1/unload_lora_adapter (unset: admin endpoints disabled)."),
    adapter_root: list[str] = typer.Option([], "--adapter-root",
                                           help="Folder admin loads may read from (repeatable; default: "
                                                "--adapters-dir)."),
    composition: list[str] = typer.Option([], "--composition",
                                          help="NAME=SPEC, e.g. mix='blend(a=0.7,b=0.3)' or "
                                               "m='merge(ties;a=0.7,b=0.3;density=0.7)' (repeatable; checked "
                                               "at start-up)."),
    ab: list[str] = typer.Option([], "--ab", help="A/B split NAME=ARM:W,ARM:W (repeatable)."),
    router: Optional[str] = typer.Option(None, "--router", help="Router folder: enables model 'auto'."),
    base_id: Optional[str] = typer.Option(None, "--base-id", help="Model id of the bare base model."),
    max_batch_size: int = typer.Option(16, "--max-batch-size"),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms"),
    max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests before answering 429."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens"),
    max_tokens_cap: Optional[int] = typer.Option(None, "--max-tokens-cap"),
    max_body_mb: float = typer.Option(4.0, "--max-body-mb", min=0.001, help="Largest request body, MiB (413 past)."),
    max_slots: int = typer.Option(32, "--max-slots", help="Adapters resident on the device at once."),
    cpu_budget_mb: Optional[float] = typer.Option(None, "--cpu-budget-mb",
                                                  help="CPU-tier byte budget (LRU adapters re-read from disk)."),
    rescan_seconds: float = typer.Option(5.0, "--rescan-seconds", min=0.0,
                                         help="Rescan --adapters-dir for new, removed and replaced adapters every "
                                              "N seconds (0: no periodic rescans; a request for an unknown name "
                                              "still finds a new folder). --ray's store looks names up on disk "
                                              "at every request instead."),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow adapter_model.bin (pickle) files."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Weight-only quantized base: int8 (per channel) "
                                                                    "or int4 (groups of 32); adapters unchanged."),
    log_level: str = typer.Option("info", "--log-level"),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: replicas load adapters on demand from "
                                                  "--adapters-dir (the shared adapter store). Needs loraplex[ray]."),
    replicas: int = typer.Option(2, "--replicas", min=1, help="With --ray: engine replicas."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="With --ray: join this Ray cluster (auto, HOST:6379, "
                                                   "ray://HOST:10001) instead of starting one on loopback."),
    max_adapters_per_replica: int = typer.Option(8, "--max-adapters-per-replica", min=1,
                                                 help="With --ray: adapter sets a replica keeps (LRU past it)."),
    replica_gpus: float = typer.Option(0.0, "--replica-gpus", help="With --ray: GPUs per replica (e.g. 1)."),
) -> None:
    """Serve the base model and its adapters with an OpenAI-compatible API (mixed-adapter batching).

    An encoder base (e.g. MiniLM) whose adapters carry task heads, or a ``model_type: encoder`` config, is served
    with /v1/classify and /v1/embeddings instead of the completion endpoints."""
    import torch

    from loraplex import cputhreads
    from loraplex.hostmem import tune_cpu_allocator
    from loraplex.serve.server import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    tune_cpu_allocator()  # this process only serves: keep large freed blocks instead of page-faulting them in
    threads = torch.get_num_threads()  # all of them for the worker that runs the model; this thread loads on one
    cputhreads.single()
    if ray:  # scale-out: see loraplex.distributed
        from loraplex.distributed.cli import serve_on_ray

        serve_on_ray(config=config, base=base, adapters=_pairs(adapter, "--adapter"), adapters_dir=adapters_dir,
                     host=host, port=port, compositions=_pairs(composition, "--composition"), ab_splits=parse_ab(ab),
                     router_dir=router, base_id=base_id, replicas=replicas, ray_address=ray_address,
                     max_adapters_per_replica=max_adapters_per_replica, replica_gpus=replica_gpus, device=device,
                     dtype=dtype, max_slots=max_slots, trust_pickle=trust_pickle, max_batch_size=max_batch_size,
                     batch_window_ms=batch_window_ms, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                     max_tokens_cap=max_tokens_cap, quantize=quantize)
        return
    try:
        if config is not None:
            if base or adapter or adapters_dir:
                raise typer.BadParameter("give either CONFIG or --base/--adapter/--adapters-dir, not both")
            extra = {"quantize": quantize} if quantize else {}  # else the config's quantization.bits
            engine, _, app = build_engine_from_config(config, admin_token=admin_token, adapter_roots=adapter_root,
                                                      threads=threads, **extra)
        else:
            if not base:
                raise typer.BadParameter("--base is required (or a CONFIG file)")
            from loraplex.models import resolve as resolve_model
            from loraplex.serve.classify import build_classify_server, is_encoder_base

            base = resolve_model(base)  # an embedded model's name (smollm2, minilm-l6) -> its folder
            if is_encoder_base(base):  # adapters carry task heads: /v1/classify and /v1/embeddings
                engine, _, app = build_classify_server(
                    base=base, adapters=_pairs(adapter, "--adapter"), adapters_dir=adapters_dir, router_dir=router,
                    base_id=base_id, compositions=_pairs(composition, "--composition"), device=device,
                    max_slots=max_slots, trust_pickle=trust_pickle, max_batch_size=max_batch_size,
                    batch_window_ms=batch_window_ms, max_queue=max_queue, max_length=max_prompt_tokens,
                    admin_token=admin_token, adapter_roots=adapter_root, cpu_budget_mb=cpu_budget_mb,
                    rescan_seconds=rescan_seconds, threads=threads)
            else:
                engine, _, app = build_server(
                    base=base, adapters=_pairs(adapter, "--adapter"), adapters_dir=adapters_dir,
                    admin_token=admin_token, adapter_roots=adapter_root,
                    compositions=_pairs(composition, "--composition"), ab_splits=parse_ab(ab), router_dir=router,
                    base_id=base_id, device=device, dtype=dtype, max_slots=max_slots, cpu_budget_mb=cpu_budget_mb,
                    trust_pickle=trust_pickle, quantize=quantize, max_batch_size=max_batch_size,
                    batch_window_ms=batch_window_ms, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                    max_tokens_cap=max_tokens_cap, rescan_seconds=rescan_seconds, threads=threads)
    except LoraplexError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    app.state.max_body_bytes = int(max_body_mb * 2**20)  # read by loraplex.serve.http.json_body
    if host not in ("127.0.0.1", "localhost", "::1") and not admin_token:
        typer.echo(f"note: listening on {host} with admin endpoints disabled (no --admin-token)", err=True)
    try:
        run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
        if engine.plex.store is not None:  # stop its rescans
            engine.plex.store.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
