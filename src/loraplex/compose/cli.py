"""``loraplex route``: train a router over named adapters from a labelled dataset and save it next to them.

::

    loraplex route --base BASE_DIR --adapter code=ad/code --adapter prose=ad/prose --adapter shell=ad/shell \\
        --data rows.jsonl --router-type mlp --top-k 1 --out ad/router

``--data`` is CSV / JSONL / JSON with a text column and a label column; labels name adapters (or are mapped with
``--label-map label=adapter``). Without ``--val-data`` a share of the rows (``--val-fraction``, split by a seeded
shuffle) is held out. Prints per-epoch metrics, the held-out routing accuracy and the per-expert load shares;
writes ``router.safetensors`` + ``router.json`` (with the adapters' folders) into ``--out``.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import typer

from loraplex.errors import LoraplexError
from loraplex.tokens import pad_batch, pad_id

EXIT_BAD_INPUT = 2


def register(app: typer.Typer) -> None:
    """Add the ``route`` command to ``app``."""

    @app.command("route")
    def route_cmd(
        base: str = typer.Option(..., "--base", help="Base model folder or hub id."),
        adapter: list[str] = typer.Option(..., "--adapter", help="Expert adapter as NAME=PATH (repeat)."),
        data: str = typer.Option(..., "--data", help="Labelled rows (.csv/.jsonl/.json): text and label columns."),
        out: str = typer.Option(..., "--out", help="Folder for router.safetensors + router.json."),
        val_data: Optional[str] = typer.Option(None, "--val-data", help="Held-out rows (default: split --data)."),
        val_fraction: float = typer.Option(0.2, "--val-fraction", min=0.0, max=0.9),
        router_type: str = typer.Option("linear", "--router-type", help="linear | mlp"),
        top_k: int = typer.Option(1, "--top-k", min=1),
        mode: Optional[str] = typer.Option(None, "--mode", help="top1 | topk | soft (default from --top-k)."),
        pooling: str = typer.Option("mean", "--pooling", help="mean | first | last | embedding | ngram"),
        embedding_model: Optional[str] = typer.Option(None, "--embedding-model",
                                                      help="Encoder folder for --pooling embedding "
                                                           "(default: bundled MiniLM)."),
        objective: str = typer.Option("supervised", "--objective", help="supervised | lm_loss | joint"),
        hidden_size: int = typer.Option(256, "--hidden-size", min=1, help="MLP router hidden size."),
        temperature: float = typer.Option(1.0, "--temperature", min=1e-6),
        noise_std: float = typer.Option(0.0, "--noise-std", min=0.0),
        epochs: int = typer.Option(30, "--epochs", min=1),
        lr: float = typer.Option(1e-2, "--lr", min=0.0),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        load_balance: str = typer.Option("switch", "--load-balance", help="switch | sq_dev | none"),
        load_balance_weight: float = typer.Option(1e-2, "--load-balance-weight", min=0.0),
        z_loss_weight: float = typer.Option(1e-3, "--z-loss-weight", min=0.0),
        max_length: int = typer.Option(128, "--max-length", min=2),
        text_column: str = typer.Option("text", "--text-column"),
        label_column: str = typer.Option("label", "--label-column"),
        label_map: list[str] = typer.Option([], "--label-map", help="LABEL=ADAPTER (repeat)."),
        seed: int = typer.Option(0, "--seed"),
        device: Optional[str] = typer.Option(None, "--device"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Print every epoch."),
    ) -> None:
        """Train a router over adapters (supervised on labels, or from the LM loss) and save it."""
        try:
            summary = run_route(base=base, adapters=_pairs(adapter, "--adapter"), data=data, out=out,
                                val_data=val_data, val_fraction=val_fraction, router_type=router_type, top_k=top_k,
                                mode=mode, pooling=pooling, embedding_model=embedding_model, objective=objective,
                                hidden_size=hidden_size, temperature=temperature, noise_std=noise_std, epochs=epochs,
                                lr=lr, batch_size=batch_size, load_balance=load_balance,
                                load_balance_weight=load_balance_weight, z_loss_weight=z_loss_weight,
                                max_length=max_length, text_column=text_column, label_column=label_column,
                                label_map=_pairs(label_map, "--label-map"), seed=seed, device=device,
                                echo=typer.echo if verbose else None)
        except LoraplexError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT)
        typer.echo(format_summary(summary))


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise LoraplexError(f"{flag} expects NAME=VALUE, got {item!r}")
        if name in out:
            raise LoraplexError(f"{flag}: {name!r} given twice")
        out[name] = value
    return out


def read_labelled(path: str, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str]]:
    """(text, label) rows of a CSV / JSONL / JSON / Parquet file."""
    from loraplex.train.data import read_rows

    rows = read_rows(path)
    if not rows:
        raise LoraplexError(f"{path}: no rows")
    out = []
    for i, row in enumerate(rows):
        if text_column not in row or label_column not in row:
            raise LoraplexError(f"{path}, row {i + 1}: needs columns {text_column!r} and {label_column!r}; has "
                                f"{sorted(row)}")
        out.append((str(row[text_column]), str(row[label_column])))
    return out


def tokenize(tokenizer: Any, texts: list[str], max_length: int, device: Any = None) -> tuple[Any, Any]:
    """Right-padded ids and mask (:func:`loraplex.tokens.pad_id` fills the padding; the tokenizer is not changed)."""
    if tokenizer is None:
        raise LoraplexError("the base model has no tokenizer; the router needs one to read text")
    seqs = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return pad_batch(seqs, pad_id(tokenizer), device=device)


def run_route(*, base: str, adapters: dict[str, str], data: str, out: str, val_data: str | None = None,
              val_fraction: float = 0.2, router_type: str = "linear", top_k: int = 1, mode: str | None = None,
              pooling: str = "mean", embedding_model: str | None = None, objective: str = "supervised",
              hidden_size: int = 256, temperature: float = 1.0, noise_std: float = 0.0, epochs: int = 30,
              lr: float = 1e-2, batch_size: int = 32, load_balance: str = "switch",
              load_balance_weight: float = 1e-2, z_loss_weight: float = 1e-3, max_length: int = 128,
              text_column: str = "text", label_column: str = "label", label_map: dict[str, str] | None = None,
              seed: int = 0, device: str | None = None, echo: Any = None) -> dict[str, Any]:
    """What ``loraplex route`` does; returns a summary dict (metrics, shares, output folder)."""
    import loraplex
    from loraplex.compose.router import save_router
    from loraplex.compose.train_router import (RouterTrainConfig, evaluate_router, fit_router, label_indices,
                                               new_router)

    if len(adapters) < 2:
        raise LoraplexError(f"a router needs at least two adapters (--adapter NAME=PATH), got {len(adapters)}")
    rows = read_labelled(data, text_column, label_column)
    if val_data:
        val_rows = read_labelled(val_data, text_column, label_column)
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_val = int(round(val_fraction * len(rows)))
        val_rows = [rows[i] for i in order[:n_val]]
        rows = [rows[i] for i in order[n_val:]]
    experts = list(adapters)
    label_map = label_map or {}
    labels = label_indices([lab for _, lab in rows], experts, label_map)
    val_labels = label_indices([lab for _, lab in val_rows], experts, label_map) if val_rows else None
    plex = loraplex.load(base, adapters=adapters, device=device, max_slots=max(len(experts), 2))
    router = new_router(plex, experts, type=router_type, top_k=top_k, mode=mode, pooling=pooling,
                        embedding_model=embedding_model, hidden_size=hidden_size, temperature=temperature,
                        noise_std=noise_std)
    router.to(plex.device)
    need_ids = pooling not in ("embedding", "ngram") or objective != "supervised"
    ids = mask = vids = vmask = None
    if need_ids:
        ids, mask = tokenize(plex.tokenizer, [t for t, _ in rows], max_length, plex.device)
        if val_rows:
            vids, vmask = tokenize(plex.tokenizer, [t for t, _ in val_rows], max_length, plex.device)
    texts = [t for t, _ in rows] if pooling in ("embedding", "ngram") else None
    vtexts = [t for t, _ in val_rows] if pooling in ("embedding", "ngram") else None
    cfg = RouterTrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, load_balance=load_balance,
                            load_balance_weight=load_balance_weight, z_loss_weight=z_loss_weight, seed=seed)
    val = {"input_ids": vids, "attention_mask": vmask, "texts": vtexts, "labels": val_labels} if val_rows else None
    log = (lambda e: echo(e.line())) if echo else None
    res = fit_router(plex, router, input_ids=ids, attention_mask=mask, texts=texts, labels=labels,
                     objective=objective, val=val, config=cfg, log=log)
    final = res.final
    summary: dict[str, Any] = {"experts": experts, "objective": objective, "train_accuracy": final.accuracy,
                               "val_accuracy": final.val_accuracy, "shares": final.shares,
                               "entropy": final.entropy, "problems": final.problems, "n_train": len(rows),
                               "n_val": len(val_rows), "out": str(out)}
    if val_rows and final.val_accuracy is not None:
        from loraplex.compose.moe import RoutedModel
        from loraplex.compose.train_router import compute_features

        vf = compute_features(RoutedModel(plex, router), vids, vmask, vtexts)
        summary["val_shares"] = evaluate_router(router, vf, val_labels)["shares"]
    save_router(router, out, adapters=adapters,
                metrics={k: summary[k] for k in ("train_accuracy", "val_accuracy", "shares", "n_train", "n_val")})
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"router over {', '.join(s['experts'])} ({s['objective']}): "
             f"train routing accuracy {s['train_accuracy']:.3f}"
             + ("" if s.get("val_accuracy") is None else f", held-out routing accuracy {s['val_accuracy']:.3f}")
             + f" ({s['n_train']} train / {s['n_val']} held-out rows)"]
    shares = s.get("val_shares") or s["shares"]
    lines.append("| expert | load share |")
    lines.append("| --- | --- |")
    for name, share in shares.items():
        lines.append(f"| {name} | {share:.3f} |")
    for p in s.get("problems") or []:
        lines.append(f"warning: {p}")
    lines.append(f"saved router -> {s['out']}")
    return "\n".join(lines)
