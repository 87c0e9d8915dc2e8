"""After training: build the config's merges and router, each only when its inputs changed.

A merge is rebuilt when its settings or a source adapter's fingerprint changed, the router when its settings, the
base model or an expert's fingerprint changed (:mod:`loraplex.run` fingerprints, recorded in ``state.json``). A
part whose adapters are not all trained is skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from loraplex.adapters.io import load_adapter
from loraplex.compose.features import NGRAM_DIM, get_embedder
from loraplex.compose.router import router_from_settings, save_router
from loraplex.compose.train_router import RouterTrainConfig, fit_router
from loraplex.config import TrainConfig
from loraplex.merge import merge_to_disk
from loraplex.run import ADAPTERS_DIR, ROUTER_DIR, TrainedRun, merge_fingerprint, router_fingerprint
from loraplex.tokens import pad_batch, pad_id
from loraplex.train.data import encode_prompt, read_rows, resolve_columns, row_prompt

__all__ = ["Built", "ROUTER_ROWS_PER_EXPERT", "build_merges", "build_router"]

#: rows per expert used to train the router (its datasets may be large)
ROUTER_ROWS_PER_EXPERT = 2000


@dataclass
class Built:
    """What a build step wrote (merge names, the router folder) and why it skipped anything."""

    merges: list[str] = field(default_factory=list)
    router: str | None = None
    notes: list[str] = field(default_factory=list)


def _skip(built: Built, msg: str, log: Callable[[str], None]) -> Built:
    built.notes.append(msg)
    log(f"warning: {msg}")
    return built


def build_merges(config: TrainConfig, run: TrainedRun, *, log: Callable[[str], None]) -> Built:
    """Write each configured merge to ``adapters/<merge name>/`` of the run when its inputs changed."""
    built = Built()
    for m in config.merges:
        sources = list(m.sources or [])
        missing = [s for s in sources if not run.has_adapter(s)]
        if missing:
            _skip(built, f"merge {m.name!r} skipped: adapters {', '.join(missing)} are not trained", log)
            continue
        fp = merge_fingerprint(config, m)
        out = run.adapter_dir(m.name)
        if run.recorded_fingerprint("merges", m.name) == fp and run.has_adapter(m.name):
            continue
        adapters = {s: load_adapter(run.adapter_dir(s), s) for s in sources}
        merge_to_disk(adapters, sources, list(m.weights or []) or None, m.combination_type, out, echo=False,
                      density=m.density, majority_sign_method=m.majority_sign_method, svd_rank=m.svd_rank,
                      normalize=m.normalize, name=m.name, peft_compat=m.peft_compat, seed=config.trainer.seed)
        log(f"merged {', '.join(sources)} -> {m.name} ({m.combination_type})")
        built.merges.append(m.name)
        run.update_state(merges={m.name: {"fingerprint": fp, "path": f"{ADAPTERS_DIR}/{m.name}", "sources": sources,
                                          "combination_type": m.combination_type}})
    return built


def build_router(config: TrainConfig, run: TrainedRun, plex_for: Callable[[int], Any], *,
                 log: Callable[[str], None]) -> Built:
    """Train the configured router on the experts' datasets (task label = the adapter each row trains) when its
    inputs changed; saved to the run's ``router/`` (``moe(<output_dir>/router)``).

    ``plex_for(n_slots)`` gives a Plex over the base model with at least ``n_slots`` slots."""
    built = Built()
    rc = config.router
    if rc is None:
        return built
    experts = list(rc.experts or config.adapter_names)
    missing = [e for e in experts if not run.has_adapter(e)]
    if missing:
        return _skip(built, f"router skipped: experts {', '.join(missing)} are not trained", log)
    fp = router_fingerprint(config)
    out = run.router_dir
    if run.recorded_fingerprint("router") == fp and run.has_router():
        return built
    plex = plex_for(len(experts))
    for e in experts:
        if e not in plex.adapters:
            plex.add_adapter(e, load_adapter(run.adapter_dir(e), e))
    texts, labels, seqs = _routing_rows(config, experts, plex.tokenizer)
    dev = next(plex.model.parameters()).device
    ids, mask = pad_batch(seqs, pad_id(plex.tokenizer), device=dev)
    if rc.pooling == "embedding":
        in_dim = int(get_embedder(rc.embedding_model).encode(texts[:1]).shape[-1])
    elif rc.pooling == "ngram":
        in_dim = NGRAM_DIM
    else:
        in_dim = int(plex.model.config.hidden_size)
    torch.manual_seed(config.trainer.seed)
    router = router_from_settings(rc, experts, in_dim).to(dev)
    tcfg = RouterTrainConfig(epochs=rc.train.epochs, lr=rc.train.learning_rate, batch_size=rc.train.batch_size,
                             load_balance=rc.load_balance, load_balance_weight=rc.load_balance_weight,
                             z_loss_weight=rc.z_loss_weight, seed=config.trainer.seed, warn=False)
    options: dict[str, Any] = {"train_adapters": False} if rc.training == "joint" else {}
    res = fit_router(plex, router, input_ids=ids, attention_mask=mask, texts=texts, labels=labels,
                     objective=rc.training, config=tcfg, **options)
    final = res.final.to_dict() if res.history else {}
    save_router(router, out, adapters={e: run.adapter_dir(e) for e in experts},
                metrics={k: v for k, v in final.items() if isinstance(v, (int, float, str))})
    acc = final.get("accuracy")
    log(f"router over {', '.join(experts)} -> {out}" + (f" (routing accuracy {acc:.1%})" if acc else ""))
    built.router = str(out)
    run.update_state(router={"fingerprint": fp, "path": ROUTER_DIR, "experts": experts,
                             **({"accuracy": acc} if acc is not None else {})})
    return built


def _routing_rows(config: TrainConfig, experts: list[str], tok: Any) -> tuple[list[str], list[str], list[list[int]]]:
    """(texts, expert labels, token ids): each expert's training rows (the prompt / text as a client would send
    it), labelled with the expert."""
    texts: list[str] = []
    labels: list[str] = []
    seqs: list[list[int]] = []
    max_len = config.trainer.max_length
    for e in experts:
        a = config.get_adapter(e)
        rows = read_rows(a.dataset)[:ROUTER_ROWS_PER_EXPERT]  # type: ignore[arg-type]
        cols = resolve_columns(rows, str(a.dataset), config.task_of(e), a, need_labels=False)
        # word lists (token tasks) only when there is no text column
        tcol = a.text_column or "text"
        col = cols.prompt or cols.text or (tcol if rows and tcol in rows[0] else cols.words)
        for i, r in enumerate(rows):
            v = r.get(col)
            text = " ".join(map(str, v)) if isinstance(v, list) else str(v)
            if cols.template is not None:  # the prompt as the adapter was trained on it
                text = row_prompt(cols, r, str(a.dataset), i)
            texts.append(text)
            labels.append(e)
            if config.model_type == "llm":
                seqs.append(encode_prompt(tok, text, max_len))
            else:
                seqs.append(list(tok(text, truncation=True, max_length=max_len)["input_ids"]))
    return texts, labels, seqs
