"""Three domain adapters on real text from this machine, a router over them, and how the compositions compare.

Data: ``code`` (Python standard-library sources), ``prose`` (licence texts, documentation, docstrings) and
``shell`` (shell scripts), built at run time from files installed here, train / validation / test split *by file*
(:func:`loraplex.demo.prose.build_domains`).

Model: a small Llama over the MiniLM tokenizer (the WordPiece tokenizer shipped with the bundled MiniLM). By default
its vocabulary is that tokenizer's restricted to the tokens seen in the training files (+ [PAD], [UNK]): about 2.6k
of the 30522 ids, which makes the LM head ~12x cheaper so the whole example fits in a few CPU minutes;
``--full-vocab`` keeps all 30522 ids (same code, ~5x slower). Its base is briefly trained on mixed text, then three
LoRA adapters are trained together in ONE mixed-batch job (each row trains its own domain's adapter). A router (linear, on the mean-pooled last hidden state of a routing pass of the
base model) is trained on the domain labels of the training files and saved next to the adapters.

Printed: routing accuracy on held-out files, and next-token loss / accuracy on held-out files for the base model,
each single adapter, the oracle (each row its own domain's adapter), a linear merge (``loraplex.merge``), a learned
blend, the logit-level ensemble, and routed top-1 / top-2 / soft. Asserts routed top-1 is within 2% of the oracle.

    python examples/domain_routing.py            # ~1-3 min on 2 CPU cores
    python examples/domain_routing.py --quick    # tiny sizes (seconds), what the test runs
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no OpenMP spin-waiting on busy cores

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import loraplex
from loraplex.compose import (LearnedBlend, LogitEnsemble, RoutedModel, Router, RouterTrainConfig,
                              TrainableAdapters, fit_router, load_router, save_router)
from loraplex.compose.blend import causal_lm_loss
from loraplex.demo.prose import build_domains

DOMAINS = ("code", "prose", "shell")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Settings:
    per_domain: dict[str, int]  # rows per domain per split
    max_length: int = 64
    hidden: int = 128
    layers: int = 2
    rank: int = 8
    base_steps: int = 100
    adapter_steps: int = 200
    blend_steps: int = 10
    batch: int = 16
    router_epochs: int = 40
    full_vocab: bool = False
    seed: int = 0


FULL = Settings({"train": 300, "validation": 50, "test": 60})
QUICK = Settings({"train": 60, "validation": 10, "test": 20}, max_length=32, hidden=64, layers=1, rank=4,
                 base_steps=30, adapter_steps=60, blend_steps=2, batch=16, router_epochs=40)


# --------------------------------------------------------------------------------------------- data
def build_data(per_domain: dict[str, int], seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """split -> [(text, domain)], split by source file."""
    data = build_domains(sizes=per_domain, seed=seed)
    return {split: [(r["text"], r["label"]) for r in rows] for split, rows in data.items()}


@dataclass
class Encoded:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        return [(self.ids[i:i + size], self.mask[i:i + size], self.labels[i:i + size])
                for i in range(0, len(self), size)]


class Vocab:
    """Token ids of the tokenizer -> model ids: all of them (``full``), or the ids seen in ``texts`` + PAD/UNK."""

    def __init__(self, tok: Any, texts: list[str] | None, max_length: int) -> None:
        self.size = tok.vocab_size
        self.table = None
        self.pad = tok.pad_token_id
        if texts is not None:
            seen = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
            keep = [tok.pad_token_id, tok.unk_token_id] + sorted({i for row in seen for i in row}
                                                                - {tok.pad_token_id, tok.unk_token_id})
            self.table = torch.full((tok.vocab_size,), 1, dtype=torch.long)  # unseen -> UNK (model id 1)
            self.table[torch.tensor(keep)] = torch.arange(len(keep))
            self.size, self.pad = len(keep), 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.table is None else self.table[ids]


def encode(tok: Any, rows: list[tuple[str, str]], max_length: int, vocab: Vocab) -> Encoded:
    texts = [t for t, _ in rows]
    enc = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length, padding="max_length",
              return_tensors="pt")
    return Encoded(vocab(enc["input_ids"]), enc["attention_mask"], [d for _, d in rows], texts)


# --------------------------------------------------------------------------------------------- models
def make_base(vocab: Vocab, s: Settings) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=s.hidden, intermediate_size=2 * s.hidden,
                      num_hidden_layers=s.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(128, s.max_length), pad_token_id=vocab.pad,
                      tie_word_embeddings=True)
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(cfg)


def pretrain_base(model: torch.nn.Module, data: Encoded, s: Settings, log: Callable[[str], None]) -> None:
    """A short LM pass over mixed-domain text, so the adapters have a sensible base to specialise."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed)
    for step in range(s.base_steps):
        b = torch.randint(0, len(data), (s.batch,), generator=g)
        loss = causal_lm_loss(model(input_ids=data.ids[b], attention_mask=data.mask[b]).logits, data.ids[b],
                              data.mask[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == s.base_steps - 1:
            log(f"  base step {step}: loss {float(loss.detach()):.3f}")
    model.eval()


def zero_adapters(base: torch.nn.Module, folder: Path, s: Settings) -> dict[str, Path]:
    """Fresh PEFT LoRA adapters (B = 0, so each starts as the base model), one per domain."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, dom in enumerate(DOMAINS):
        torch.manual_seed(s.seed + 100 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=s.rank, lora_alpha=2 * s.rank, target_modules=TARGETS,
                                                             task_type="CAUSAL_LM"))
        pm.save_pretrained(str(folder / dom))
        paths[dom] = folder / dom
    return paths


def train_adapters_mixed(plex: loraplex.Plex, data: Encoded, s: Settings, log: Callable[[str], None]) -> None:
    """All three adapters in ONE mixed-batch job: every row trains its own domain's adapter."""
    trainable = TrainableAdapters(plex, list(DOMAINS))
    opt = torch.optim.AdamW(trainable.parameters(), lr=1e-2 if s.hidden <= 64 else 5e-3)
    g = torch.Generator().manual_seed(s.seed + 1)
    try:
        for step in range(s.adapter_steps):
            b = torch.randint(0, len(data), (s.batch,), generator=g)
            rows = [data.labels[i] for i in b.tolist()]
            with trainable.active(), plex.using(rows, len(rows)):
                out = plex.model(input_ids=data.ids[b], attention_mask=data.mask[b])
            loss = causal_lm_loss(out.logits, data.ids[b], data.mask[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 40 == 0 or step == s.adapter_steps - 1:
                log(f"  adapters step {step}: loss {float(loss.detach()):.3f}")
    finally:
        trainable.commit()


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def score(run: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor], data: Encoded, batch: int
          ) -> dict[str, Any]:
    """Token-weighted next-token loss and accuracy, overall and per domain."""
    sums: dict[str, list[float]] = {d: [0.0, 0.0, 0.0] for d in (*DOMAINS, "all")}  # loss, correct, tokens
    for ids, mask, labels in data.batches(batch):
        logits = run(ids, mask, labels).float()
        tgt = ids[:, 1:]
        valid = (mask[:, 1:] & mask[:, :-1]).bool()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                               reduction="none").view_as(tgt)
        hit = (logits[:, :-1].argmax(-1) == tgt)
        for i, dom in enumerate(labels):
            v = valid[i]
            for key in (dom, "all"):
                sums[key][0] += float(ce[i][v].sum())
                sums[key][1] += float(hit[i][v].sum())
                sums[key][2] += float(v.sum())
    return {k: {"loss": v[0] / max(v[2], 1), "acc": v[1] / max(v[2], 1)} for k, v in sums.items()}


def run_example(s: Settings, out_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print,
                threads: int | None = 2) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from loraplex.compose.features import minilm_path

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lpx-domains-"))
    tok = AutoTokenizer.from_pretrained(minilm_path())
    raw = build_data(s.per_domain, s.seed)
    vocab = Vocab(tok, None if s.full_vocab else [t for t, _ in raw["train"]], s.max_length)
    train, val, test = (encode(tok, raw[k], s.max_length, vocab) for k in ("train", "validation", "test"))
    log(f"data: {len(train)} train / {len(val)} validation / {len(test)} test rows "
        f"(held-out files), {s.max_length} tokens each; model vocabulary {vocab.size}  "
        f"[{time.perf_counter() - t0:.0f}s]")

    base = make_base(vocab, s)
    pretrain_base(base, train, s, log)
    paths = zero_adapters(base, out / "init", s)
    plex = loraplex.load(base, adapters={d: str(p) for d, p in paths.items()},
                         tokenizer=tok if s.full_vocab else None)
    train_adapters_mixed(plex, train, s, log)
    for d in DOMAINS:  # the trained adapters, PEFT format, with the router next to them
        plex.save_adapter(d, out / "adapters" / d)
    log(f"trained base + 3 adapters  [{time.perf_counter() - t0:.0f}s]")

    # router: supervised on the training files' domain labels, on the base model's pooled hidden state
    router = Router(list(DOMAINS), s.hidden, type="linear", pooling="mean")
    res = fit_router(plex, router, input_ids=train.ids, attention_mask=train.mask, labels=train.labels,
                     val={"input_ids": val.ids, "attention_mask": val.mask, "labels": val.labels},
                     config=RouterTrainConfig(epochs=s.router_epochs, lr=2e-2, batch_size=32, seed=s.seed))
    save_router(router, out / "adapters" / "router", adapters={d: out / "adapters" / d for d in DOMAINS},
                metrics={"val_accuracy": res.final.val_accuracy})
    router = load_router(out / "adapters" / "router", list(DOMAINS))  # what `moe(DIR)` would load
    top1 = RoutedModel(plex, router)
    with torch.no_grad():
        routed = [top1.route(ids, mask).top1 for ids, mask, _ in test.batches(32)]
    pred = [p for chunk in routed for p in chunk]
    route_acc = sum(p == y for p, y in zip(pred, test.labels)) / len(test)
    shares = {d: pred.count(d) / len(pred) for d in DOMAINS}
    log(f"router: held-out routing accuracy {route_acc:.3f}, load {shares}  [{time.perf_counter() - t0:.0f}s]")

    # compositions
    from loraplex.merge.merge import merge_adapters

    merged, _ = merge_adapters({d: plex.get_adapter(d) for d in DOMAINS}, list(DOMAINS), [1, 1, 1], "linear",
                               name="merged", normalize=True)
    plex.add_adapter("merged", merged)
    blend = LearnedBlend(plex, list(DOMAINS))
    blend.fit([(ids, mask) for ids, mask, _ in val.batches(s.batch)][: max(1, s.blend_steps)], epochs=1, lr=0.3)
    bw = blend.choice()
    ensemble = LogitEnsemble(plex, {d: 1 / 3 for d in DOMAINS})
    top2 = RoutedModel(plex, router, top_k=2, mode="topk")
    soft = RoutedModel(plex, router, mode="soft")

    def fixed(choice: Any) -> Callable[..., torch.Tensor]:
        return lambda ids, mask, labels: plex(ids, adapters=choice, attention_mask=mask).logits

    methods: list[tuple[str, Callable[..., torch.Tensor]]] = [("base model", fixed(None))]
    methods += [(f"adapter {d} only", fixed(d)) for d in DOMAINS]
    methods += [
        ("oracle (own domain's adapter)",
         lambda ids, mask, labels: plex(ids, adapters=list(labels), attention_mask=mask).logits),
        ("linear merge (loraplex.merge, 1/3 each)", fixed("merged")),
        ("blend, learned weights " + "/".join(f"{bw[d]:.2f}" for d in DOMAINS),
         lambda ids, mask, labels: blend(ids, mask).logits),
        ("logit ensemble (1/3 each)", lambda ids, mask, labels: ensemble(ids, mask).logits),
        ("routed top-1", lambda ids, mask, labels: top1(ids, mask).logits),
        ("routed top-2 (renormalised)", lambda ids, mask, labels: top2(ids, mask).logits),
        ("routed soft", lambda ids, mask, labels: soft(ids, mask).logits),
    ]
    results = {name: score(fn, test, s.batch) for name, fn in methods}
    log(f"evaluated {len(methods)} methods  [{time.perf_counter() - t0:.0f}s]")
    oracle = results["oracle (own domain's adapter)"]["all"]
    routed1 = results["routed top-1"]["all"]
    summary = {
        "routing_accuracy": route_acc, "routing_shares": shares, "router_val_accuracy": res.final.val_accuracy,
        "blend_weights": bw, "results": results, "seconds": time.perf_counter() - t0, "out": str(out),
        "routed_vs_oracle_loss": routed1["loss"] / oracle["loss"] - 1,
        "routed_vs_oracle_acc": routed1["acc"] / oracle["acc"] - 1,
    }
    summary["table"] = table(summary)
    return summary


def table(summary: dict[str, Any]) -> str:
    res = summary["results"]
    oracle = res["oracle (own domain's adapter)"]["all"]["loss"]
    lines = [f"Routing accuracy on held-out files: {summary['routing_accuracy']:.1%} "
             f"(load: " + ", ".join(f"{d} {v:.0%}" for d, v in summary["routing_shares"].items()) + ")", "",
             "| method | loss | token acc | loss vs oracle | code loss | prose loss | shell loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res.items():
        a = r["all"]
        lines.append(f"| {name} | {a['loss']:.3f} | {a['acc']:.1%} | {a['loss'] / oracle - 1:+.1%} | "
                     + " | ".join(f"{r[d]['loss']:.3f}" for d in DOMAINS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (what the test runs)")
    ap.add_argument("--out", default=None, help="folder for the adapters and the router (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-vocab", action="store_true", help="all 30522 tokenizer ids in the model (slower)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--seed", type=int, default=0, help="seed of data sampling, model init and training")
    args = ap.parse_args(argv)
    s = dataclasses.replace(QUICK if args.quick else FULL, full_vocab=args.full_vocab, seed=args.seed)
    summary = run_example(s, args.out, threads=args.threads)
    print()
    print(summary["table"])
    print(f"\nrouted top-1 vs oracle: loss {summary['routed_vs_oracle_loss']:+.2%}, token accuracy "
          f"{summary['routed_vs_oracle_acc']:+.2%}; total {summary['seconds']:.0f}s; adapters + router in "
          f"{summary['out']}/adapters")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2))
    ok = summary["routed_vs_oracle_loss"] <= 0.02 and summary["routed_vs_oracle_acc"] >= -0.02
    if not ok:
        print("FAILED: routed top-1 is not within 2% of the oracle", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
