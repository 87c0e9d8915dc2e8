"""Routed MoE generation throughput, as ratios measured in one run.

Llama-shaped model (default hidden 1024, 4 layers, all 7 linear targets, r=16), 8 expert adapters, a linear router
on the routing pass's pooled hidden state. For batch 16 and 32 (prompt 32 tokens, 64 new tokens, greedy, fixed
length) it times:

* ``single``   -- every row on one adapter: ``plex.generate(ids, adapters="e0")`` (the target: >= 0.9x of this);
* ``routed``   -- :class:`loraplex.compose.RoutedModel` top-1: one routing pass, then ONE mixed-batch generation
  where each row runs its own expert (the routing pass is included in the time);
* ``routed_early`` / ``routed_emb`` -- the same with a router reading the hidden state after block 1, or the
  pooled input embeddings (``hidden_layer=1`` / ``0``): the routing pass stops there (a quarter of the model /
  only the embedding lookup);
* ``mixed``    -- the same generation with the routing decisions given (no routing pass): the runtime's share;
* ``loop``     -- the naive design: for each row, route it and generate it alone (one forward per row per step);
* ``base``     -- the bare base model, for reference.

Prints a markdown table of tokens/s and the ratios routed/single and routed/loop.

    python benchmarks/moe.py            # full (~2-4 min on 2 CPU cores)
    python benchmarks/moe.py --quick    # small model, smoke test
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import loraplex
from timing import timeit_interleaved, add_malloc_option, tune_host  # benchmarks/timing.py
from loraplex.compose import RoutedModel, Router

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
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
    tune_host(args)
    if args.quick:
        args.hidden, args.layers, args.experts, args.repeats, args.new, args.loop_rows = 128, 2, 4, 2, 8, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    base = LlamaForCausalLM(cfg).eval()
    base.generation_config.eos_token_id = None
    names = [f"e{i}" for i in range(args.experts)]
    tmp = tempfile.mkdtemp(prefix="lpx-moe-bench-")
    pm = None
    for name in names:
        lc = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(copy.deepcopy(base), lc, adapter_name=name)
        else:
            pm.add_adapter(name, lc)
    pm.save_pretrained(tmp)
    plex = loraplex.load(copy.deepcopy(base), loraplex.load_adapter_dir(tmp), device=dev,
                         max_slots=args.experts)
    router = Router(names, args.hidden).to(dev).eval()
    with torch.no_grad():
        router.head[-1].weight.mul_(20)  # decisive and spread over the experts (random features)
    rm = RoutedModel(plex, router)  # routing pass: the whole model (last hidden state), LM head skipped
    early = Router(names, args.hidden, hidden_layer=1).to(dev).eval()
    early.load_state_dict(router.state_dict())
    rm_early = RoutedModel(plex, early)  # routing pass stops after block 1
    emb = Router(names, args.hidden, hidden_layer=0).to(dev).eval()
    emb.load_state_dict(router.state_dict())
    rm_emb = RoutedModel(plex, emb)  # pooled input embeddings: the routing pass stops before block 1
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    rows = []
    print(f"device {dev}, threads {args.threads}: hidden {args.hidden}, {args.layers} layers, {args.experts} experts "
          f"r={args.rank} on {len(TARGETS)} targets, prompt {args.prompt}, {args.new} new tokens")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, cfg.vocab_size, (batch, args.prompt), device=dev)
        loop_n = min(args.loop_rows, batch)
        with torch.no_grad():
            routing = rm.route(ids)
        chosen = routing.top1
        fns = {
            "base": lambda: plex.generate(ids, adapters=None, **gen),
            "single": lambda: plex.generate(ids, adapters="e0", **gen),
            "routed": lambda: rm.generate(ids, **gen),
            "routed_early": lambda: rm_early.generate(ids, **gen),
            "routed_emb": lambda: rm_emb.generate(ids, **gen),
            "mixed": lambda: rm.generate(ids, routing=routing, **gen),
            "loop": lambda: [rm.generate(ids[i:i + 1], **gen) for i in range(loop_n)],
        }
        t = timeit_interleaved(fns, args.repeats, warmup=1, ref="single")
        t["loop"] = t["loop"] * batch / loop_n  # per-row cost scaled to the whole batch
        tps = {k: batch * args.new / v for k, v in t.items()}
        rows.append((batch, len(set(chosen)), tps))
        print(f"batch {batch}: distinct experts routed {len(set(chosen))}; " +
              ", ".join(f"{k} {v:.0f} tok/s" for k, v in tps.items()), flush=True)

    print()
    print("| batch | experts used | base | single adapter | routed: last layer | routed: block 1 | "
          "routed: embeddings | mixed generation only | per-example loop | last layer / single | block 1 / single | "
          "embeddings / single | mixed only / single | last layer / loop |")
    print("| --- " * 15 + "|")
    for batch, used, tps in rows:
        sg = tps["single"]
        print(f"| {batch} | {used} | {tps['base']:.0f} | {sg:.0f} | {tps['routed']:.0f} | {tps['routed_early']:.0f} | "
              f"{tps['routed_emb']:.0f} | {tps['mixed']:.0f} | {tps['loop']:.0f} | {tps['routed'] / sg:.2f}x | "
              f"{tps['routed_early'] / sg:.2f}x | {tps['routed_emb'] / sg:.2f}x | {tps['mixed'] / sg:.2f}x | "
              f"{tps['routed'] / tps['loop']:.1f}x |")
    print("(tokens/s; routed columns include the routing pass)")
    for key, what in (("routed", "routing on the last layer"), ("routed_early", "routing on block 1"),
                      ("routed_emb", "routing on the embeddings")):
        worst = min(tps[key] / tps["single"] for _, _, tps in rows)
        print(f"routed top-1 ({what}) vs single adapter: worst {worst:.2f}x (target >= 0.90x)")


if __name__ == "__main__":
    main()
