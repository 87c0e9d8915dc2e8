"""Start (or join) Ray, and run the loraplex application on Ray Serve."""

from __future__ import annotations

import logging
import time
from typing import Any

from loraplex.distributed.settings import RaySettings
from loraplex.errors import LoraplexError

log = logging.getLogger("loraplex.distributed")

APP_NAME = "loraplex"
LOOPBACK = "127.0.0.1"


def require_ray() -> Any:
    """The ``ray`` module, or a clear error naming the extra to install."""
    try:
        import ray
        from ray import serve  # noqa: F401 - ray without the serve extra is not enough
    except ImportError as exc:
        raise LoraplexError(f"Ray Serve is not installed ({exc}); install it with: pip install 'loraplex[ray]'"
                            ) from None
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             object_store_mb: int | None = None) -> Any:
    """Connect to the Ray cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), or start a
    private one-node Ray on loopback (no dashboard) when ``address`` is None."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        kw: dict[str, Any] = {}
        if object_store_mb:
            kw["object_store_memory"] = int(object_store_mb) * 2**20
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address=LOOPBACK, log_to_driver=False, **kw)
    return ray


def start_app(settings: RaySettings, *, host: str = LOOPBACK, port: int = 8000, timeout_s: float = 300.0) -> str:
    """Deploy the application (Ray must be initialised); its base URL once every replica is up."""
    require_ray()
    from ray import serve

    from loraplex.distributed.deployments import build_app

    serve.start(http_options={"host": host, "port": port})
    t0 = time.monotonic()
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    _wait_running(timeout_s - (time.monotonic() - t0))
    log.info("loraplex on Ray Serve: %d replica(s) up in %.1fs", settings.replicas, time.monotonic() - t0)
    return f"http://{host}:{port}"


def _wait_running(timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + max(timeout_s, 1.0)
    while True:
        app = serve.status().applications.get(APP_NAME)
        state = str(getattr(app, "status", "")).rsplit(".", 1)[-1]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise LoraplexError(f"the loraplex Ray Serve application failed to start: {app.message}")
        if time.monotonic() > deadline:
            raise LoraplexError(f"the loraplex Ray Serve application did not start within {timeout_s:.0f}s "
                                f"(status {state}: {getattr(app, 'message', '')})")
        time.sleep(0.2)


def stop(shutdown_ray: bool = True) -> None:
    """Tear the application down (and the private Ray started by :func:`init_ray`)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if shutdown_ray and ray.is_initialized():
            ray.shutdown()


def serve_forever(settings: RaySettings, *, address: str | None = None, host: str = LOOPBACK, port: int = 8000,
                  num_cpus: int | None = None) -> None:
    """``loraplex serve --ray``: start or join Ray, deploy, serve until interrupted, tear down."""
    import signal
    import threading

    def _terminate(*_: Any) -> None:
        raise KeyboardInterrupt

    init_ray(address, num_cpus=num_cpus)
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, docker stop) tears down too
        signal.signal(signal.SIGTERM, _terminate)  # (after ray.init, which installs its own handler)
    try:
        url = start_app(settings, host=host, port=port)
        print(f"loraplex on Ray Serve: {settings.replicas} replica(s) at {url} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(shutdown_ray=address is None)
