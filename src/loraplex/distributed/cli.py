"""Command-line glue: ``loraplex serve --ray`` and ``loraplex train --ray`` (errors -> message + exit code 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import typer

from loraplex.errors import LoraplexError


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def serve_on_ray(*, config: Optional[Path], base: Optional[str], adapters: Mapping[str, str],
                 adapters_dir: Optional[str], host: str, port: int, replicas: int, ray_address: Optional[str],
                 max_adapters_per_replica: int, replica_gpus: float = 0.0, **options: Any) -> None:
    """Start (or join) Ray and serve until interrupted."""
    from loraplex.distributed.cluster import serve_forever
    from loraplex.distributed.settings import RaySettings
    from loraplex.distributed.store import AdapterStore

    if config is not None:
        _fail("--ray takes --base and --adapters-dir (the shared adapter store), not a CONFIG file; point "
              "--adapters-dir at the config's output folder/adapters")
    if not base:
        _fail("--ray needs --base (the base model folder, at the same path on every Ray node)")
    if not adapters_dir and not adapters:
        _fail("--ray needs --adapters-dir: the adapter store every replica reads adapters from")
    try:
        store = AdapterStore.of(adapters_dir, paths=adapters)
        base_id = options.pop("base_id", None) or Path(base).name or "base"
        settings = RaySettings(base=base, store=store, base_id=base_id,
                               replicas=replicas, max_adapters_per_replica=max_adapters_per_replica,
                               replica_gpus=replica_gpus, compositions=options.pop("compositions", None) or {},
                               ab_splits=options.pop("ab_splits", None) or {}, **options)
        serve_forever(settings, address=ray_address, host=host, port=port)
    except (LoraplexError, ValueError) as exc:
        _fail(str(exc))


def train_on_ray(config: str, *, only: Sequence[str] | None, output_dir: Optional[str], force: bool,
                 device: Optional[str], ray_address: Optional[str] = None) -> Any:
    """Train the config's adapters as parallel Ray tasks; the merged :class:`TrainResult`."""
    from loraplex.distributed.cluster import init_ray
    from loraplex.distributed.train import ray_train

    from loraplex.distributed.cluster import require_ray

    ray = require_ray()
    started = not ray.is_initialized()
    init_ray(ray_address)
    try:
        return ray_train(config, only=only, output_dir=output_dir, force=force, device=device)
    finally:
        if started and ray_address is None:  # the private Ray started for this run
            ray.shutdown()
