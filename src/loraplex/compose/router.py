"""Routers: which adapter (expert) serves which sequence -- or, for the token-gated type, which token in which layer.

Two kinds, found by name in :data:`ROUTER_TYPES` (add your own with :func:`register_router_type`):

* ``linear`` / ``mlp`` -- :class:`Router`, a sequence router. Its input is one vector per sequence: the pooled last
  hidden state of a routing pass of the base model (``pooling``: ``mean`` over non-pad tokens, ``first``, ``last``)
  or a sentence embedding (``pooling="embedding"``, ``embedding_model``: a folder, default the bundled MiniLM).
  Output: logits over the experts, turned into top-1 / top-k (renormalised) / soft weights with a temperature;
  in training optional Gaussian noise (``noise_std``) or Shazeer's noisy top-k (``noisy_gating``: a softplus
  noise-std head), and an optional top-1 capacity.
* ``token_gated`` -- :class:`TokenGatedRouter` (X-LoRA / MoLE style): one gate per wrapped layer maps the layer's
  input token to weights over the experts, so the mixture changes per token and per layer (see ``moe.GatedModel``).

On disk (next to the adapters it routes over): ``router.safetensors`` (weights) + ``router.json`` (type, sizes,
expert names, pooling, top_k, mode, temperature, embedding source, and the adapters' folders relative to it).
Loading against a different adapter set is an error that lists the expected and the given names.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from loraplex.adapters.io import atomic_write_text
from loraplex.compose import functional as F
from loraplex.compose.losses import RouterCollapseWarning, load_shares, warn_collapse  # noqa: F401 (re-export)
from loraplex.errors import LoraplexError

ROUTER_JSON = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
FORMAT = "loraplex-router"
FORMAT_VERSION = 1
SEQUENCE_POOLINGS = ("mean", "first", "last", "embedding", "ngram")
TEXT_POOLINGS = ("embedding", "ngram")  # features computed from the raw texts, not from a routing pass


class RouterError(LoraplexError, ValueError):
    """A router file is missing or malformed, or does not fit the adapters it is used with."""


#: name -> router class (a class with ``from_config(dict)`` and ``config() -> dict``).
ROUTER_TYPES: dict[str, type] = {}
#: name -> head factory ``(in_dim, n_experts, hidden_size, dropout) -> nn.Module`` for :class:`Router`.
ROUTER_HEADS: dict[str, Callable[[int, int, int, float], nn.Module]] = {}


def register_router_type(name: str, cls: type, head: Callable[[int, int, int, float], nn.Module] | None = None
                         ) -> None:
    """Register a router class under ``name`` (with ``head``: a new head type for the sequence :class:`Router`)."""
    ROUTER_TYPES[name] = cls
    if head is not None:
        ROUTER_HEADS[name] = head


def _linear_head(d: int, k: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d, k))


def _mlp_head(d: int, k: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, k))


def _check_experts(experts: Sequence[str]) -> list[str]:
    names = [str(e) for e in experts]
    if len(names) < 1:
        raise RouterError("a router needs at least one expert")
    if len(set(names)) != len(names):
        raise RouterError(f"router experts must be distinct, got {names}")
    return names


class Router(nn.Module):
    """A sequence router: features [N, in_dim] -> logits [N, K] -> :class:`~loraplex.compose.functional.Gates`."""

    def __init__(self, experts: Sequence[str], in_dim: int, *, type: str = "linear", hidden_size: int = 256,
                 pooling: str = "mean", embedding_model: str | None = None, top_k: int = 1, mode: str | None = None,
                 temperature: float = 1.0, noise_std: float = 0.0, noisy_gating: bool = False,
                 capacity_factor: float | None = None, dropout: float = 0.0, hidden_layer: int = -1) -> None:
        super().__init__()
        self.experts = _check_experts(experts)
        if type not in ROUTER_HEADS:
            raise RouterError(f"unknown router type {type!r}; sequence router types: {', '.join(ROUTER_HEADS)}")
        if pooling not in SEQUENCE_POOLINGS:
            raise RouterError(f"unknown pooling {pooling!r}; expected one of {', '.join(SEQUENCE_POOLINGS)}")
        mode = mode or ("top1" if top_k == 1 else "topk")
        if mode not in F.ROUTE_MODES:
            raise RouterError(f"unknown routing mode {mode!r}; expected one of {', '.join(F.ROUTE_MODES)}")
        if not 1 <= top_k <= len(self.experts):
            raise RouterError(f"top_k must be between 1 and {len(self.experts)} (the number of experts), got {top_k}")
        if temperature <= 0:
            raise RouterError(f"temperature must be > 0, got {temperature}")
        self.type = type
        self.in_dim = int(in_dim)
        self.hidden_size = int(hidden_size)
        self.pooling = pooling
        self.embedding_model = embedding_model
        self.top_k = int(top_k)
        self.mode = mode
        self.temperature = float(temperature)
        self.noise_std = float(noise_std)
        self.noisy_gating = bool(noisy_gating)
        self.capacity_factor = capacity_factor
        self.dropout = float(dropout)
        self.hidden_layer = int(hidden_layer)
        self.adapter_paths: dict[str, str] = {}
        self.head = ROUTER_HEADS[type](self.in_dim, len(self.experts), self.hidden_size, self.dropout)
        self.noise_head = nn.Linear(self.in_dim, len(self.experts)) if self.noisy_gating else None
        if self.noise_head is not None:
            nn.init.zeros_(self.noise_head.weight)
            nn.init.constant_(self.noise_head.bias, -2.0)  # softplus(-2) ~ 0.13: little noise at first
        self.register_buffer("feature_mean", torch.zeros(self.in_dim))
        self.register_buffer("feature_std", torch.ones(self.in_dim))

    # ------------------------------------------------------------------ properties
    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def uses_embedding(self) -> bool:
        return self.pooling == "embedding"

    @property
    def uses_texts(self) -> bool:
        """Whether the features come from the raw texts (sentence embedding or hashed n-grams)."""
        return self.pooling in TEXT_POOLINGS

    @torch.no_grad()
    def fit_normalizer(self, features: torch.Tensor) -> None:
        """Standardise inputs with the mean/std of (training) ``features`` [N, in_dim] (saved with the router)."""
        if self.pooling == "ngram":  # already L2 normalised; standardising sparse buckets blows up unseen ones
            return
        f = features.float()
        self.feature_mean.copy_(f.mean(0))
        self.feature_std.copy_(f.std(0, unbiased=False).clamp_min(1e-6) if f.shape[0] > 1 else torch.ones_like(
            self.feature_std))

    # ------------------------------------------------------------------ forward
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [N, K] (without noise)."""
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise RouterError(f"router expects features [N, {self.in_dim}], got shape {tuple(features.shape)}")
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return self.head(x)

    def noisy_logits(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Training-time noise: learned softplus std (``noisy_gating``) or fixed ``noise_std``."""
        if self.noise_head is not None:
            x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
            return F.add_noise(logits, nn.functional.softplus(self.noise_head(x)))
        return F.add_noise(logits, self.noise_std)

    def gates(self, features: torch.Tensor, *, mode: str | None = None, top_k: int | None = None,
              temperature: float | None = None, top1_weight: str = "one", noise: bool | None = None
              ) -> tuple[torch.Tensor, F.Gates]:
        """(logits, gates) for ``features``; noise is added when training (or ``noise=True``)."""
        logits = self(features)
        noisy = self.training if noise is None else noise
        routed = self.noisy_logits(features, logits) if noisy else logits
        k = self.top_k if top_k is None else top_k
        m = mode or (self.mode if top_k is None else ("top1" if k == 1 else "topk"))
        g = F.route(routed, m, k, self.temperature if temperature is None else temperature, top1_weight)
        if self.capacity_factor and m == "top1":
            g = F.apply_capacity(g, self.capacity_factor)
        return logits, g

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        return {"type": self.type, "experts": list(self.experts), "in_dim": self.in_dim,
                "hidden_size": self.hidden_size, "pooling": self.pooling, "embedding_model": self.embedding_model,
                "top_k": self.top_k, "mode": self.mode, "temperature": self.temperature, "noise_std": self.noise_std,
                "noisy_gating": self.noisy_gating, "capacity_factor": self.capacity_factor, "dropout": self.dropout,
                "hidden_layer": self.hidden_layer}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Router":
        keys = ("type", "hidden_size", "pooling", "embedding_model", "top_k", "mode", "temperature", "noise_std",
                "noisy_gating", "capacity_factor", "dropout", "hidden_layer")
        return cls(cfg["experts"], int(cfg["in_dim"]), **{k: cfg[k] for k in keys if k in cfg})

    def extra_repr(self) -> str:
        return (f"type={self.type}, experts={self.experts}, pooling={self.pooling}, mode={self.mode}, "
                f"top_k={self.top_k}, temperature={self.temperature}")


class TokenGatedRouter(nn.Module):
    """Per-token, per-layer gates (X-LoRA / MoLE style): ``g = softmax(x W_l / T)`` over the experts at each
    wrapped layer ``l`` from that layer's input ``x``; ``mode="topk"`` keeps each token's ``top_k`` gates
    (renormalised). Gates start at zero weights, i.e. a uniform mixture."""

    type = "token_gated"

    def __init__(self, experts: Sequence[str], layers: Mapping[str, int], *, temperature: float = 1.0,
                 mode: str = "soft", top_k: int = 1) -> None:
        super().__init__()
        self.experts = _check_experts(experts)
        if not layers:
            raise RouterError("a token-gated router needs at least one layer")
        if mode not in ("soft", "topk"):
            raise RouterError(f"token-gated mode must be soft or topk, got {mode!r}")
        if not 1 <= top_k <= len(self.experts):
            raise RouterError(f"top_k must be between 1 and {len(self.experts)}, got {top_k}")
        self.layer_dims = {str(k): int(v) for k, v in layers.items()}
        self.temperature = float(temperature)
        self.mode = mode
        self.top_k = int(top_k)
        self.adapter_paths: dict[str, str] = {}
        self.gates_by_layer = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        for i, (name, d) in enumerate(self.layer_dims.items()):
            key = f"l{i}"
            lin = nn.Linear(d, len(self.experts))
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.gates_by_layer[key] = lin
            self._keys[name] = key

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def gate(self, module_name: str, x: torch.Tensor) -> torch.Tensor:
        """Gates [..., K] for the input tokens ``x`` [..., d_in] of wrapped layer ``module_name``."""
        key = self._keys.get(module_name)
        if key is None:
            raise RouterError(f"token-gated router has no gate for layer {module_name!r}")
        lin = self.gates_by_layer[key]
        g = torch.softmax(lin(x.to(lin.weight.dtype)) / self.temperature, dim=-1)
        if self.mode == "topk" and self.top_k < self.n_experts:
            p, idx = g.topk(self.top_k, dim=-1)
            g = torch.zeros_like(g).scatter(-1, idx, p / p.sum(-1, keepdim=True).clamp_min(1e-12))
        return g

    def config(self) -> dict[str, Any]:
        return {"type": self.type, "experts": list(self.experts), "layers": dict(self.layer_dims),
                "temperature": self.temperature, "mode": self.mode, "top_k": self.top_k}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TokenGatedRouter":
        return cls(cfg["experts"], cfg["layers"], temperature=cfg.get("temperature", 1.0),
                   mode=cfg.get("mode", "soft"), top_k=cfg.get("top_k", 1))


register_router_type("linear", Router, _linear_head)
register_router_type("mlp", Router, _mlp_head)
register_router_type("token_gated", TokenGatedRouter)

AnyRouter = Router | TokenGatedRouter


def build_router(experts: Sequence[str], in_dim: int | None = None, *, type: str = "linear", **settings: Any
                 ) -> AnyRouter:
    """A fresh router of a registered ``type`` (settings as in the class; ``layers=`` for ``token_gated``)."""
    cls = ROUTER_TYPES.get(type)
    if cls is None:
        raise RouterError(f"unknown router type {type!r}; known: {', '.join(ROUTER_TYPES)}")
    if cls is Router:
        if in_dim is None:
            raise RouterError("a sequence router needs in_dim (the feature size)")
        return Router(experts, in_dim, type=type, **settings)
    return cls(experts, **settings)


def router_from_settings(settings: Mapping[str, Any] | Any, experts: Sequence[str], in_dim: int) -> Router:
    """A :class:`Router` from the training config's ``adapters.router`` block (a pydantic model or a dict:
    type, hidden_size, top_k, mode, pooling, embedding_model, temperature, noise_std)."""
    s = settings.model_dump() if hasattr(settings, "model_dump") else dict(settings)
    keys = ("type", "hidden_size", "top_k", "mode", "pooling", "embedding_model", "temperature", "noise_std",
            "noisy_gating", "capacity_factor", "dropout")
    return Router(list(s.get("experts") or experts), in_dim, **{k: s[k] for k in keys if s.get(k) is not None})


# --------------------------------------------------------------------------------------------- save / load
def save_router(router: AnyRouter, path: str | os.PathLike, *, adapters: Mapping[str, str | os.PathLike] | None = None,
                metrics: Mapping[str, Any] | None = None) -> Path:
    """Write ``router.safetensors`` + ``router.json`` into folder ``path`` (each file atomically; other files in
    the folder, e.g. the adapters, are left alone). ``adapters`` {expert: folder} are recorded relative to ``path``
    so ``moe(path)`` can load them."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    paths = dict(getattr(router, "adapter_paths", {}) or {})
    for name, p in (adapters or {}).items():
        if name not in router.experts:
            raise RouterError(f"adapter path given for {name!r}, which is not an expert of the router "
                              f"({', '.join(router.experts)})")
        try:
            paths[name] = os.path.relpath(os.path.abspath(p), os.path.abspath(folder))
        except ValueError:  # another drive (Windows)
            paths[name] = os.path.abspath(p)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **router.config(), "adapters": paths}
    if metrics:
        meta["metrics"] = dict(metrics)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in router.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{ROUTER_WEIGHTS}.", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "loraplex": FORMAT})
        os.replace(tmp, folder / ROUTER_WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(folder / ROUTER_JSON, json.dumps(meta, indent=2, sort_keys=True))
    router.adapter_paths = paths
    return folder


def read_router_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``router.json`` of a router folder (or the file itself)."""
    p = Path(path)
    cfg_file = p if p.is_file() else p / ROUTER_JSON
    if not cfg_file.is_file():
        raise RouterError(f"{p}: not a router folder (no {ROUTER_JSON})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise RouterError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise RouterError(f"{cfg_file}: not a loraplex router file (format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
    if int(cfg.get("version", 0)) > FORMAT_VERSION:
        raise RouterError(f"{cfg_file}: router format version {cfg.get('version')} is newer than this loraplex "
                          f"({FORMAT_VERSION})")
    for key in ("type", "experts"):
        if key not in cfg:
            raise RouterError(f"{cfg_file}: missing field {key!r}")
    return cfg


def check_router_experts(expected: Sequence[str], given: Sequence[str] | None, *, allow_extra: bool = False,
                         where: str = "router") -> None:
    """Error unless ``given`` is the router's expert set (a superset with ``allow_extra``)."""
    if given is None:
        return
    exp, giv = set(expected), set(given)
    missing = [e for e in expected if e not in giv]
    extra = sorted(giv - exp)
    if missing or (extra and not allow_extra):
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if extra and not allow_extra:
            parts.append(f"unexpected: {', '.join(extra)}")
        raise RouterError(f"{where} routes over adapters [{', '.join(expected)}] but was given "
                          f"[{', '.join(sorted(giv)) or '(none)'}] ({'; '.join(parts)})")


def load_router(path: str | os.PathLike, expected: Sequence[str] | None = None, *, allow_extra: bool = False,
                map_location: str | torch.device = "cpu") -> AnyRouter:
    """Read a router folder; with ``expected`` (adapter names), fail unless they are exactly the router's experts
    (or a superset, with ``allow_extra``). ``router.adapter_paths`` holds the adapters' folders (absolute)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    cfg = read_router_config(folder)
    check_router_experts(cfg["experts"], expected, allow_extra=allow_extra, where=f"router {str(folder)!r}")
    cls = ROUTER_TYPES.get(cfg["type"])
    if cls is None:
        raise RouterError(f"{folder / ROUTER_JSON}: unknown router type {cfg['type']!r}; known: "
                          f"{', '.join(ROUTER_TYPES)}")
    try:
        router = cls.from_config(cfg)
    except (KeyError, TypeError) as exc:
        raise RouterError(f"{folder / ROUTER_JSON}: incomplete router config ({exc})") from exc
    wfile = folder / ROUTER_WEIGHTS
    if not wfile.is_file():
        raise RouterError(f"{folder}: missing {ROUTER_WEIGHTS}")
    try:
        state = load_file(str(wfile), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise RouterError(f"{wfile}: corrupt or unreadable ({exc})") from exc
    own = router.state_dict()
    bad = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    if bad or unexpected:
        raise RouterError(f"{wfile}: weights do not match {ROUTER_JSON} (missing or wrong shape: {bad[:5]}, "
                          f"unexpected: {unexpected[:5]})")
    router.load_state_dict(state)
    router.adapter_paths = {n: str((folder / p).resolve()) if not os.path.isabs(p) else p
                            for n, p in (cfg.get("adapters") or {}).items()}
    router.to(map_location).eval()
    return router
