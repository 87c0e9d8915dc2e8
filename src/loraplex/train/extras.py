"""After training: build the config's merges and router (only when their inputs changed)."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from loraplex.adapters.io import CONFIG_NAME

if TYPE_CHECKING:  # pragma: no cover
    from loraplex.train.trainer import Trainer, TrainResult

__all__ = ["build_merges", "build_router", "merge_fingerprint", "router_fingerprint"]


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def merge_fingerprint(trainer: "Trainer", merge: Any) -> str:
    cfg = trainer.config
    return _hash({"merge": merge.model_dump(mode="json"),
                  "sources": {s: cfg.adapter_fingerprint(s) for s in merge.sources}})


def router_fingerprint(trainer: "Trainer") -> str:
    cfg = trainer.config
    router = cfg.router
    assert router is not None
    return _hash({"router": router.model_dump(mode="json"), "base_model": cfg.base_model,
                  "experts": {e: cfg.adapter_fingerprint(e) for e in router.experts or []}})


def build_merges(trainer: "Trainer", result: "TrainResult") -> None:
    """Write each configured merge to ``<output_dir>/adapters/<merge name>/`` when its sources changed."""
    from loraplex.adapters.io import load_adapter
    from loraplex.train.trainer import ADAPTERS_DIR, load_state

    cfg = trainer.config
    if not cfg.merges:
        return
    try:
        from loraplex.merge import merge_to_disk
    except ImportError:  # pragma: no cover - merge ships with loraplex
        msg = "merge skipped: loraplex.merge is not available in this build"
        result.notes.append(msg)
        trainer.log(f"warning: {msg}")
        return
    state = load_state(trainer.output_dir)
    folder = trainer.output_dir / ADAPTERS_DIR
    for m in cfg.merges:
        sources = list(m.sources or [])
        missing = [s for s in sources if not (folder / s / CONFIG_NAME).is_file()]
        if missing:
            msg = f"merge {m.name!r} skipped: adapters {', '.join(missing)} are not trained yet"
            result.notes.append(msg)
            trainer.log(f"warning: {msg}")
            continue
        fp = merge_fingerprint(trainer, m)
        out = folder / m.name
        if state.get("merges", {}).get(m.name, {}).get("fingerprint") == fp and (out / CONFIG_NAME).is_file():
            continue
        adapters = {s: load_adapter(folder / s, s) for s in sources}
        _, report, _ = merge_to_disk(adapters, sources, list(m.weights or []) or None, m.combination_type, out,
                                     echo=False, density=m.density, majority_sign_method=m.majority_sign_method,
                                     svd_rank=m.svd_rank, normalize=m.normalize, name=m.name,
                                     peft_compat=m.peft_compat, seed=cfg.trainer.seed)
        trainer.log(f"merged {', '.join(sources)} -> {m.name} ({m.combination_type})")
        result.merges.append(m.name)
        _record(trainer, "merges", m.name, {"fingerprint": fp, "path": f"{ADAPTERS_DIR}/{m.name}",
                                             "sources": sources, "combination_type": m.combination_type})


#: rows per expert used to train the router (its datasets may be large)
ROUTER_ROWS_PER_EXPERT = 2000


def build_router(trainer: "Trainer", result: "TrainResult", *, retrained: bool) -> None:
    """Train the configured router on the experts' datasets (task label = the adapter each row trains) when the
    router settings or any expert changed; saved to ``<output_dir>/router/`` (``moe(<output_dir>/router)``)."""
    import torch

    from loraplex.adapters.io import load_adapter
    from loraplex.train.data import read_rows, resolve_columns
    from loraplex.tokens import pad_batch, pad_id
    from loraplex.train.trainer import ADAPTERS_DIR, ROUTER_DIR, load_state

    cfg = trainer.config
    rc = cfg.router
    if rc is None:
        return
    try:
        from loraplex.compose.router import router_from_settings, save_router
        from loraplex.compose.train_router import RouterTrainConfig, fit_router
    except ImportError:  # pragma: no cover - compose ships with loraplex
        msg = "router skipped: loraplex.compose router training is not available in this build"
        result.notes.append(msg)
        trainer.log(f"warning: {msg}")
        return
    experts = list(rc.experts or cfg.adapter_names)
    folder = trainer.output_dir / ADAPTERS_DIR
    missing = [e for e in experts if not (folder / e / CONFIG_NAME).is_file()]
    if missing:
        msg = f"router skipped: experts {', '.join(missing)} are not trained yet"
        result.notes.append(msg)
        trainer.log(f"warning: {msg}")
        return
    fp = router_fingerprint(trainer)
    out = trainer.output_dir / ROUTER_DIR
    if load_state(trainer.output_dir).get("router", {}).get("fingerprint") == fp and (out / "router.json").is_file():
        return
    plex = trainer._ensure_plex(len(experts))
    for e in experts:
        if e not in plex.adapters:
            plex.add_adapter(e, load_adapter(folder / e, e))
    # routing inputs: each expert's training rows (the prompt / text), labelled with the expert
    tok = plex.tokenizer
    texts: list[str] = []
    labels: list[str] = []
    seqs: list[list[int]] = []
    max_len = cfg.trainer.max_length
    for e in experts:
        a = cfg.get_adapter(e)
        task = a.task or ("causal_lm" if cfg.model_type == "llm" else "classification")
        rows = read_rows(a.dataset)[:ROUTER_ROWS_PER_EXPERT]  # type: ignore[arg-type]
        cols = resolve_columns(rows, str(a.dataset), task, a, need_labels=False)
        # the raw text as a client would send it; word lists (token tasks) only when there is no text column
        tcol = getattr(a, "text_column", None) or "text"
        col = cols.prompt or cols.text or (tcol if rows and tcol in rows[0] else cols.words)
        for r in rows:
            v = r.get(col)
            text = " ".join(map(str, v)) if isinstance(v, list) else str(v)
            texts.append(text)
            labels.append(e)
            if cfg.model_type == "llm":
                from loraplex.train.data import encode_prompt

                seqs.append(encode_prompt(tok, text, max_len))
            else:
                seqs.append(list(tok(text, truncation=True, max_length=max_len)["input_ids"]))
    dev = next(plex.model.parameters()).device
    ids, mask = pad_batch(seqs, pad_id(tok), device=dev)
    if rc.pooling == "embedding":
        from loraplex.compose.features import get_embedder

        in_dim = int(get_embedder(rc.embedding_model).encode(texts[:1]).shape[-1])
    elif rc.pooling == "ngram":
        from loraplex.compose.features import NGRAM_DIM

        in_dim = NGRAM_DIM
    else:
        in_dim = int(plex.model.config.hidden_size)
    torch.manual_seed(cfg.trainer.seed)
    router = router_from_settings(rc, experts, in_dim).to(dev)
    tcfg = RouterTrainConfig(epochs=rc.train.epochs, lr=rc.train.learning_rate, batch_size=rc.train.batch_size,
                             load_balance=rc.load_balance, load_balance_weight=rc.load_balance_weight,
                             z_loss_weight=rc.z_loss_weight, seed=cfg.trainer.seed, warn=False)
    options: dict[str, Any] = {"train_adapters": False} if rc.training == "joint" else {}
    res = fit_router(plex, router, input_ids=ids, attention_mask=mask, texts=texts, labels=labels,
                     objective=rc.training, config=tcfg, **options)
    final = res.final.to_dict() if res.history else {}
    save_router(router, out, adapters={e: folder / e for e in experts},
                metrics={k: v for k, v in final.items() if isinstance(v, (int, float, str))})
    acc = final.get("accuracy")
    trainer.log(f"router over {', '.join(experts)} -> {out}" + (f" (routing accuracy {acc:.1%})" if acc else ""))
    result.router = str(out)
    _record(trainer, "router", "router", {"fingerprint": fp, "path": ROUTER_DIR, "experts": experts, **(
        {"accuracy": acc} if acc is not None else {})})


def _record(trainer: "Trainer", section: str, name: str, rec: dict[str, Any]) -> None:
    from loraplex.adapters.io import atomic_write_text
    from loraplex.train.trainer import STATE_NAME, load_state

    state = load_state(trainer.output_dir)
    if section == "router":
        state["router"] = rec
    else:
        state.setdefault(section, {})[name] = rec
    atomic_write_text(trainer.output_dir / STATE_NAME, json.dumps(state, indent=2, sort_keys=True))
