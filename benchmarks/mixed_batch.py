"""Mixed-batch forward cost, as ratios to the bare base model, measured in one run.

Llama-shaped model (synthetic: random init, hidden 1024, 4 layers; or ``--model smollm2``: the real
SmolLM2-135M-Instruct, 30 layers, hidden 576, GQA 9/3, vocab 49,152), all 7 linear targets, r=16, batch 16 x 64
tokens (prefill) and a decode step (16 rows x 1 new token over a 64-token KV cache). Compares: base, loraplex single
adapter, loraplex 16 distinct adapters mixed, the same mixed batch with DoRA adapters (the same factors plus a
magnitude vector; target: DoRA rows <= 1.05x plain LoRA rows), PEFT single adapter, PEFT ``adapter_names`` mixed
batch, and a naive per-row loop.

    python benchmarks/mixed_batch.py                    # full run (~2-4 min on 2 CPU cores)
    python benchmarks/mixed_batch.py --quick            # smaller model, for a smoke test
    python benchmarks/mixed_batch.py --model smollm2    # the real SmolLM2 shapes and weights
    python benchmarks/mixed_batch.py --model smollm2 --quick   # batch 8 x 32, 8 adapters, 3 repeats
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from models import (add_model_options, check_model_options, describe, is_real, load_base,  # benchmarks/models.py
                    peft_adapters_on)
from timing import timeit_interleaved, add_malloc_option, tune_host  # benchmarks/timing.py
from transformers import DynamicCache

import loraplex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    add_model_options(ap, hidden=1024, layers=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_malloc_option(ap)
    args = ap.parse_args()
    check_model_options(ap, args)
    tune_host(args)
    if args.quick:
        args.repeats, args.adapters = 3, 8
        if is_real(args):  # fixed shapes: a smaller batch instead
            args.batch, args.seq = 8, 32
        else:
            args.hidden, args.layers = 256, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = load_base(args)
    cfg = base.config
    tmp = tempfile.mkdtemp(prefix="lpx-bench-")
    names = [f"a{i}" for i in range(args.adapters)]
    peft_model, paths = peft_adapters_on(base, tmp, names, r=args.rank)
    peft_model = peft_model.to(dev).eval()
    plex = loraplex.load(copy.deepcopy(base), paths, device=dev, max_slots=args.adapters)
    plex_dora = loraplex.load(copy.deepcopy(base), dora_copies(paths), device=dev, max_slots=args.adapters)
    base = base.to(dev)

    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)
    mixed = [names[i % len(names)] for i in range(args.batch)]

    # decode step: a KV cache of seq tokens, then one new token per row
    def cache_for(model_call):
        with torch.no_grad():
            out = model_call(ids)
        return out.past_key_values

    step = torch.randint(0, cfg.vocab_size, (args.batch, 1), device=dev)
    pos = torch.full((args.batch, 1), args.seq, device=dev)

    def run(call, decode: bool):
        if not decode:
            return lambda: call(ids)
        cache = cache_for(call)
        snap = [(k.clone(), v.clone()) for k, v in _layers(cache)]

        def go():
            c = DynamicCache()
            for li, (k, v) in enumerate(snap):
                c.update(k, v, li)
            return call(step, past_key_values=c, position_ids=pos)
        return go

    def peft_single(x, **kw):
        peft_model.set_adapter(names[0])
        return peft_model(input_ids=x, **kw)

    def peft_mixed(x, **kw):
        return peft_model(input_ids=x, adapter_names=mixed[: x.shape[0]], **kw)

    def naive(x, **kw):  # the design we avoid: one forward per row with the row's adapter active
        outs = []
        for r in range(x.shape[0]):
            sub = {k: (v[r:r + 1] if torch.is_tensor(v) else v) for k, v in kw.items() if k != "past_key_values"}
            outs.append(plex(x[r:r + 1], adapters=mixed[r], **sub).logits)
        return outs

    def forced(kernel):  # the mixed batch with one kernel forced in every layer (the automatic choice is "auto")
        def call(x, **kw):
            for layer in plex.layers.values():
                layer.kernel = kernel
            try:
                return plex(x, adapters=mixed, **kw)
            finally:
                for layer in plex.layers.values():
                    layer.kernel = "auto"
        return call

    calls = {
        "base": lambda x, **kw: base(input_ids=x, **kw),
        "loraplex single": lambda x, **kw: plex(x, adapters=names[0], **kw),
        f"loraplex mixed ({args.adapters} adapters)": lambda x, **kw: plex(x, adapters=mixed, **kw),
        f"loraplex DoRA mixed ({args.adapters} DoRA adapters)": lambda x, **kw: plex_dora(x, adapters=mixed, **kw),
        "  mixed, sgmv forced": forced("sgmv"),
        "  mixed, bgmv forced": forced("bgmv"),
        "  mixed, segbmm forced": forced("segbmm"),
        "peft single": peft_single,
        f"peft mixed adapter_names ({args.adapters})": peft_mixed,
        "naive per-row loop (prefill only)": naive,
    }
    print(f"# mixed_batch: {describe(args, cfg)}; r={args.rank} targets=7 batch={args.batch}x{args.seq} "
          f"adapters={args.adapters} device={dev} threads={torch.get_num_threads()}")
    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for phase in ("prefill", "decode"):
            fns = {}
            for label, call in calls.items():
                if phase == "decode" and label.startswith("naive"):
                    continue
                fn = run(call, phase == "decode")
                if dev.type == "cuda":
                    def fn(inner=fn):
                        inner()
                        torch.cuda.synchronize()
                fns[label] = fn
            results[phase] = timeit_interleaved(fns, args.repeats if phase == "prefill" else args.repeats * 3,
                                                 ref="base")
    print()
    print(f"| variant | prefill {args.batch}x{args.seq} (x base) | decode step {args.batch}x1 (x base) |")
    print("| --- | --- | --- |")
    for label in calls:
        pre = results["prefill"][label] / results["prefill"]["base"]
        dec = results["decode"].get(label)
        dec_s = f"{dec / results['decode']['base']:.3f}" if dec is not None else "-"
        print(f"| {label} | {pre:.3f} | {dec_s} |")
    mk = f"loraplex mixed ({args.adapters} adapters)"
    pk = f"peft mixed adapter_names ({args.adapters})"
    print()
    for phase in ("prefill", "decode"):
        r = results[phase]
        over = (r[pk] - r["base"]) / max(r[mk] - r["base"], 1e-9)
        print(f"{phase}: mixed/base={r[mk] / r['base']:.3f}  single/base={r['loraplex single'] / r['base']:.3f}  "
              f"peft-mixed/ours-mixed={r[pk] / r[mk]:.2f}x  LoRA overhead peft/ours={over:.1f}x")
    dk = f"loraplex DoRA mixed ({args.adapters} DoRA adapters)"
    print("DoRA rows / plain LoRA rows (same factors, same row layout): "
          + "  ".join(f"{phase}={results[phase][dk] / results[phase][mk]:.3f}" for phase in ("prefill", "decode")))
    print("targets (DESIGN.md): LoRA overhead peft/ours >= 4 (prefill and decode); mixed/base <= 1.08 on SmolLM2's "
          "shapes; single/base <= 1.03; DoRA rows <= 1.05x plain LoRA rows")
    d_in, d_ff = cfg.hidden_size, cfg.intermediate_size
    d_kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or d_in // cfg.num_attention_heads)
    shapes = [(d_in, d_in)] * 2 + [(d_in, d_kv)] * 2 + [(d_in, d_ff)] * 2 + [(d_ff, d_in)]
    extra = sum(args.adapters * args.rank * (i + o) for i, o in shapes) / sum(i * o for i, o in shapes)
    print(f"decode bytes bound: {args.adapters} distinct adapters read {extra:.2f}x extra weight bytes per layer "
          f"(memory-bound decode cannot beat ~{1 + extra:.2f}x base)")


def dora_copies(adapters: dict[str, loraplex.LoraAdapter], seed: int = 0) -> dict[str, loraplex.LoraAdapter]:
    """Each adapter as a DoRA adapter: the same factors plus a random positive magnitude vector per module."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ad in adapters.items():
        mods = {m: loraplex.LoraModule(lm.A, lm.B, lm.scaling, 0.5 + torch.rand(lm.B.shape[0], generator=gen))
                for m, lm in ad.modules.items()}
        out[name] = loraplex.LoraAdapter(name, ad.spec.copy(use_dora=True), mods)
    return out


def _layers(cache):
    """(key, value) per layer of a transformers cache, across cache API versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


if __name__ == "__main__":
    main()
