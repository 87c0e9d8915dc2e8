"""What a Ray Serve deployment of loraplex is made of (plain data: it travels to every replica)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from loraplex.distributed.store import AdapterStore
from loraplex.quant import scheme_of


@dataclass
class RaySettings:
    """Options of :func:`loraplex.distributed.build_app`.

    ``base`` and the store's folders must be readable at the same paths on every node that runs a replica.
    ``max_adapters_per_replica`` is Ray's ``max_num_models_per_replica``: past it a replica evicts its least recently
    used adapter (set). ``replica_gpus=1`` gives each replica its own GPU (``device`` then defaults to cuda)."""

    base: str
    store: AdapterStore = field(default_factory=AdapterStore)
    base_id: str = "base"
    replicas: int = 2
    max_adapters_per_replica: int = 8
    compositions: Mapping[str, str] = field(default_factory=dict)
    ab_splits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    router: Any = None  # a router object run at the ingress (``route_texts`` / callable), or
    router_dir: str | None = None  # a saved sequence router (the ingress then loads the base model for it)
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # "int8" | "int4": each replica's base weight-only quantized (loraplex.quant)
    max_slots: int = 32
    trust_pickle: bool = False
    max_batch_size: int = 16
    batch_window_ms: float = 5.0
    max_queue: int = 256
    max_prompt_tokens: int | None = None
    max_tokens_cap: int | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ingress_cpus: float = 0.0
    max_ongoing_requests: int = 64
    torch_threads: int | None = None  # per replica (None: torch's default)
    unload_timeout: float = 60.0

    def __post_init__(self) -> None:
        self.quantize = scheme_of(self.quantize)  # an unknown scheme fails here, not in every replica
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_adapters_per_replica < 1:
            raise ValueError(f"max_adapters_per_replica must be >= 1, got {self.max_adapters_per_replica}")
