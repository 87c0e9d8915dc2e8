"""Prometheus metrics in the text exposition format (0.0.4), without a client library.

Counters, gauges and histograms with labels, thread-safe; :class:`ServeMetrics` holds the server's set and
renders them (plus the adapter bank's cache counters) for ``GET /metrics``.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], Any] = {}

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing number per label set."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: object) -> float:
        with self._lock:
            return float(self._values.get(self._key(labels), 0.0))

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    """A number that goes up and down (or is read from a callback at render time)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 fn: Callable[[], float | dict[tuple[str, ...], float]] | None = None) -> None:
        super().__init__(name, help, labels)
        self.fn = fn

    def set(self, value: float, **labels: object) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = float(value)

    def render(self) -> list[str]:
        if self.fn is not None:
            got = self.fn()
            with self._lock:
                self._values = dict(got) if isinstance(got, dict) else {(): float(got)}
        return super().render()


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: Iterable[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets)) + (math.inf,)

    def observe(self, value: float, **labels: object) -> None:
        k = self._key(labels)
        with self._lock:
            counts, total = self._values.get(k, ([0] * len(self.buckets), 0.0))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
            self._values[k] = (counts, total + value)

    def count(self, **labels: object) -> int:
        with self._lock:
            got = self._values.get(self._key(labels))
            return int(got[0][-1]) if got else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._values.items())
        if not items and not self.labelnames:
            items = [((), ([0] * len(self.buckets), 0.0))]
        out = self.header()
        for k, (counts, total) in items:
            for b, c in zip(self.buckets, counts):
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, k, le)} {c}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, k)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, k)} {counts[-1]}")
        return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LOAD_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class ServeMetrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.requests = Counter("loraplex_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.request_latency = Histogram("loraplex_request_latency_seconds",
                                         "Time from admission to the last token, per generation request.",
                                         LATENCY_BUCKETS)
        self.prompt_tokens = Counter("loraplex_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("loraplex_generation_tokens_total", "Tokens generated.")
        self.finished = Counter("loraplex_generations_total",
                                "Finished generation requests by finish reason (stop, length, cancelled, error).",
                                ("reason",))
        self.rejected = Counter("loraplex_requests_rejected_total",
                                "Requests refused before generation, by reason.", ("reason",))
        self.deferred = Counter("loraplex_admissions_deferred_total",
                                "Admissions postponed because every device slot was held by running requests.")
        self.batch_size = Histogram("loraplex_batch_size", "Rows in each model forward (prefill or decode step).",
                                    BATCH_BUCKETS, ("phase",))
        self.adapter_requests = Counter("loraplex_adapter_requests_total",
                                        "Generation requests per adapter they used (base: no adapter).",
                                        ("adapter",))
        self.adapter_loads = Counter("loraplex_adapter_loads_total", "Admin adapter loads by result.",
                                     ("adapter", "result"))
        self.adapter_load_seconds = Gauge("loraplex_adapter_load_seconds",
                                          "Seconds the last admin load of each adapter took (disk to CPU tier).",
                                          ("adapter",))
        self.adapter_unloads = Counter("loraplex_adapter_unloads_total", "Admin adapter unloads by result.",
                                       ("adapter", "result"))
        self.adapter_loading = Counter("loraplex_admissions_loading_total",
                                       "Requests that waited in the loading state for a store adapter's first read.")
        self.tier_load_seconds = Histogram("loraplex_adapter_tier_load_seconds",
                                           "Adapter load latency per tier: disk (file -> CPU tier, validated) and "
                                           "slot (CPU tier -> device slot).", LOAD_BUCKETS, ("tier",))
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting for a batch slot.")
        self.running = Gauge("loraplex_running_requests", "Requests in the running batch.")
        self._extra: list[_Metric] = []
        self._registered: list[_Metric] = []

    def register(self, *metrics: _Metric) -> None:
        """Export more metrics (e.g. the merge cache's) after the server's own; one registered under the same name
        before is replaced."""
        names = {m.name for m in metrics}
        self._registered = [m for m in self._registered if m.name not in names] + list(metrics)

    def attach_engine(self, engine: Any) -> None:
        """Gauges read from the engine and its adapter bank at scrape time."""
        plex = engine.plex
        plex.on_load(lambda tier, seconds: self.tier_load_seconds.observe(seconds, tier=tier))
        self.queue_depth.fn = lambda: engine.queue_depth
        self.running.fn = lambda: engine.running_count

        def stat(field: str) -> Callable[[], float]:
            return lambda: float(getattr(plex.stats, field))

        self._extra = [
            Gauge("loraplex_cache_hits_total", "Device-slot hits (adapter already resident).", fn=stat("hits")),
            Gauge("loraplex_cache_misses_total", "Device-slot misses (adapter copied into a slot).",
                  fn=stat("misses")),
            Gauge("loraplex_cache_evictions_total", "Device-slot LRU evictions.", fn=stat("evictions")),
            Gauge("loraplex_cache_cpu_evictions_total", "CPU-tier evictions under the byte budget.",
                  fn=stat("cpu_evictions")),
            Gauge("loraplex_cache_disk_loads_total", "Store adapters read from disk into the CPU tier (first reads).",
                  fn=stat("disk_loads")),
            Gauge("loraplex_cache_disk_reloads_total", "Adapters re-read from disk after a CPU-tier eviction.",
                  fn=stat("disk_reloads")),
            Gauge("loraplex_cache_load_errors_total", "Store adapters that failed to read or validate.",
                  fn=stat("load_errors")),
            Gauge("loraplex_cache_slot_load_seconds_total", "Seconds spent copying adapters into device slots.",
                  fn=stat("load_seconds")),
            Gauge("loraplex_cache_resident_adapters", "Adapters currently in device slots.",
                  fn=lambda: float(len(plex.resident()))),
            Gauge("loraplex_cache_registered_adapters", "Adapters servable by name (registered and in the store).",
                  fn=lambda: float(len(plex.adapters))),
            Gauge("loraplex_cache_cpu_adapters", "Adapters whose tensors are in the CPU tier.",
                  fn=lambda: float(plex.cpu_adapters())),
            Gauge("loraplex_cache_bytes", "Bytes held per tier.", ("tier",),
                  fn=lambda: {(k,): float(v) for k, v in plex.nbytes().items()}),
        ]
        for m in self._extra:  # counters exported from a callback keep their counter type
            if m.name.endswith("_total"):
                m.kind = "counter"

    def render(self) -> str:
        metrics: list[_Metric] = [
            self.requests, self.request_latency, self.prompt_tokens, self.generation_tokens, self.finished,
            self.rejected, self.deferred, self.batch_size, self.adapter_requests, self.adapter_loads,
            self.adapter_load_seconds, self.adapter_unloads, self.adapter_loading, self.tier_load_seconds,
            self.queue_depth, self.running, *self._extra, *self._registered,
        ]
        lines: list[str] = []
        for m in metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
