"""Serving from a large adapter store: start-up, memory, cold vs hot first requests, Zipf traffic over all adapters.

A Llama-shaped random-init model (``--hidden`` / ``--layers``, MiniLM tokenizer), LoRA adapters r=``--rank`` on
q/k/v/o written straight with safetensors into a temporary store (``loraplex.serve.testing.random_adapters``), for
each store size in ``--sizes`` (default 10, 1,000, 10,000). Each size runs in a fresh process
(``loraplex.serve.cli.build_server(adapters_dir=...)``, the ``loraplex serve --adapters-dir`` path) and reports:

* start-up: seconds of ``build_server`` (model load, store index, engine), and its ratio to the smallest store;
* RSS after start-up, after ``GET /v1/models`` and after the traffic, and the growth over the smallest store's
  process next to the CPU-tier budget (``--cpu-budget-mb``), split into anonymous
  memory (``RssAnon`` + ``RssShmem``: the heap and the CPU tier's page buffers) and file-mapped pages (``RssFile``:
  mostly the base model's safetensors mapping, whose touched pages follow the tokens generated, e.g. embedding
  rows, so every process pages the whole base in after start-up); anonymous RSS less the CPU tier's bytes (what the process holds besides adapters: its growth across sizes
  is memory outside the budget); ``/v1/models`` latency;
* first-request latency of a cold adapter (on disk) vs a hot one (in a slot): p50 / p99 of one-token requests;
* throughput (generated tokens/s) of Zipf(``--zipf``) traffic over all adapters as a ratio to single-adapter
  traffic, the two measured in interleaved rounds in the same process (median of the per-round ratios), with the
  default slots (``--max-slots``), plus the disk reads (first loads and re-reads after a CPU-tier eviction).

    python benchmarks/scale.py            # hidden 512, 4 layers, r=16 (the issue's shapes); ~10 GB of adapters
    python benchmarks/scale.py --quick    # hidden 128, 2 layers, r=8: ~0.6 GB at 10,000 adapters
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def rss_mb(field: str = "VmRSS") -> float:
    """Resident MB from /proc/self/status: ``VmRSS`` (all), ``RssAnon`` (the heap, page buffers), ``RssFile``
    (file pages mapped in: the base model's safetensors mapping, libraries), ``RssShmem``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def zipf_names(names: list[str], s: float, n: int, rng: random.Random) -> list[str]:
    weights = [1.0 / (k + 1) ** s for k in range(len(names))]
    order = list(names)
    rng.shuffle(order)  # popularity independent of the name
    return rng.choices(order, weights=weights, k=n)


# --------------------------------------------------------------------------- one store size (child process)
def child(args: argparse.Namespace) -> dict:
    import torch
    from fastapi.testclient import TestClient

    from loraplex.hostmem import tune_cpu_allocator
    from loraplex.serve import SamplingParams
    from loraplex.serve.cli import build_server

    from loraplex import cputhreads

    cputhreads.single()  # as `loraplex serve` does: this thread loads on one, the engine's worker gets the threads
    tune_cpu_allocator()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    engine, registry, app = build_server(base=args.base, adapters_dir=args.store, cpu_budget_mb=args.cpu_budget_mb,
                                         max_slots=args.max_slots, max_batch_size=args.batch, batch_window_ms=2,
                                         max_queue=4096, rescan_seconds=0,
                                         adapter_roots=[args.store, args.all], threads=args.threads)
    startup = time.perf_counter() - t0
    plex = engine.plex
    with torch.no_grad():  # page the whole base in (its weights are a file mapping, paged in as rows are used), so
        for t in plex.model.state_dict().values():  # RSS growth counts adapters, not which embedding rows the
            t.float().sum()  # generated tokens happened to touch
    rss_start = rss_mb()
    names = sorted(plex.adapters)
    out: dict = {"n": len(names), "startup_s": startup, "rss_before_mb": rss0, "rss_start_mb": rss_start}
    try:
        with TestClient(app) as client:
            t0 = time.perf_counter()
            body = client.get("/v1/models").json()
            out["models_s"] = time.perf_counter() - t0
            out["models_listed"] = sum(1 for m in body["data"] if m["x_loraplex_kind"] == "adapter")
            out["models_bytes_cpu_after"] = plex.nbytes()["cpu"]
        out["rss_models_mb"] = rss_mb()
        ids = plex.tokenizer("the quick brown fox jumps over the lazy dog").input_ids
        one = SamplingParams(max_tokens=1, temperature=0.0)
        rng = random.Random(0)
        cold = rng.sample(names, min(args.cold, len(names)))
        cold_s, hot_s = [], []
        for name in cold:
            t0 = time.perf_counter()
            engine.generate(ids, name, one, timeout=120)
            cold_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.generate(ids, name, one, timeout=120)
            hot_s.append(time.perf_counter() - t0)
        out.update(cold_p50_ms=1e3 * pct(cold_s, 0.5), cold_p99_ms=1e3 * pct(cold_s, 0.99),
                   hot_p50_ms=1e3 * pct(hot_s, 0.5), hot_p99_ms=1e3 * pct(hot_s, 0.99))

        gen = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        single = names[0]
        loads0, reloads0 = plex.stats.disk_loads, plex.stats.disk_reloads

        def run(choices: list[str]) -> float:
            t0 = time.perf_counter()
            handles = engine.submit_many([(ids, c, gen) for c in choices])
            toks = sum(len(h.result(timeout=600).token_ids) for h in handles)
            return toks / (time.perf_counter() - t0)

        run([single] * args.batch)  # warm-up
        ratios, zipf_tps, single_tps = [], [], []
        for _ in range(args.rounds):
            a = run([single] * args.requests)
            b = run(zipf_names(names, args.zipf, args.requests, rng))
            single_tps.append(a)
            zipf_tps.append(b)
            ratios.append(b / a)
        out.update(single_tok_s=statistics.median(single_tps), zipf_tok_s=statistics.median(zipf_tps),
                   zipf_ratio=statistics.median(ratios),
                   disk_loads=plex.stats.disk_loads - loads0, disk_reloads=plex.stats.disk_reloads - reloads0,
                   cpu_evictions=plex.stats.cpu_evictions, slot_evictions=plex.stats.evictions,
                   cpu_tier_mb=plex.nbytes()["cpu"] / 2**20, rss_end_mb=rss_mb(),
                   anon_end_mb=rss_mb("RssAnon") + rss_mb("RssShmem"), file_end_mb=rss_mb("RssFile"),
                   deferred=engine.metrics.deferred.value())
    finally:
        engine.close()
    return out


# --------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and load (smoke test)")
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--cpu-budget-mb", type=float, default=None, help="CPU-tier budget (default: 1%% of the "
                                                                       "largest store's bytes, at least 8 MB)")
    ap.add_argument("--max-slots", type=int, default=32, help="device slots (the server's default: 32)")
    ap.add_argument("--batch", type=int, default=16, help="max batch size")
    ap.add_argument("--requests", type=int, default=None, help="requests per round and scenario")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=None, help="tokens generated per request")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--cold", type=int, default=None, help="cold/hot first-request samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="write the stores here (kept) instead of a temp folder")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cargs = argparse.Namespace(**json.loads(args.child))
        print("RESULT " + json.dumps(child(cargs)), flush=True)
        return
    q = args.quick
    hidden = args.hidden or (128 if q else 512)
    layers = args.layers or (2 if q else 4)
    rank = args.rank or (8 if q else 16)
    requests = args.requests or (48 if q else 200)
    tokens = args.tokens or (8 if q else 16)
    cold = args.cold or (12 if q else 50)
    sizes = [int(x) for x in args.sizes.split(",")]

    from transformers import AutoModelForCausalLM

    from loraplex.serve.testing import random_adapters, tiny_llama

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loraplex-scale-"))
    try:
        base = work / "base"
        if not (base / "config.json").is_file():
            tiny_llama(base, hidden=hidden, layers=layers, heads=max(4, hidden // 64), kv_heads=max(2, hidden // 128),
                       max_positions=512)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        store = work / "store"
        have = len([p for p in store.iterdir()]) if store.is_dir() else 0
        t0 = time.perf_counter()
        names = [f"ad{i:05d}" for i in range(max(sizes))]
        if have < len(names):
            random_adapters(model, store, names[have:], r=rank, alpha=2 * rank, targets=TARGETS, seed=have)
        write_s = time.perf_counter() - t0
        one = sum(f.stat().st_size for f in (store / names[0]).iterdir())
        budget = args.cpu_budget_mb or max(8.0, round(0.01 * one * max(sizes) / 2**20, 1))
        print(f"# adapter store scale: Llama hidden {hidden}, {layers} layers, r={rank} on {'/'.join(TARGETS)}; "
              f"{one / 1024:.0f} KB per adapter; wrote {len(names) - have} adapters in {write_s:.1f} s; "
              f"CPU budget {budget} MB, {args.max_slots} slots, batch {args.batch}; "
              f"{requests} requests x {tokens} tokens x {args.rounds} rounds")
        results = []
        for n in sizes:
            sub = work / f"store-{n}"  # a store of the first n adapters (their files hard-linked)
            if sub.exists():
                shutil.rmtree(sub)
            sub.mkdir()
            for name in names[:n]:
                (sub / name).mkdir()
                for f in (store / name).iterdir():
                    os.link(f, sub / name / f.name)
            cargs = dict(base=str(base), store=str(sub), all=str(store), cpu_budget_mb=budget, max_slots=args.max_slots,
                         batch=args.batch, requests=requests, tokens=tokens, rounds=args.rounds, zipf=args.zipf,
                         cold=cold, threads=args.threads)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cargs)], capture_output=True,
                                  text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"store size {n}: the child process failed")
            results.append(json.loads(line[7:]))
            print(f"  done {n} adapters", file=sys.stderr, flush=True)
        small = results[0]
        print()
        print("| adapters | start-up s | vs smallest | RSS start MB | RSS growth vs smallest MB | /v1/models s "
              "| cold p50/p99 ms | hot p50/p99 ms | Zipf tok/s | single tok/s | Zipf/single | disk loads | "
              "disk re-reads | CPU tier MB | RSS end MB | anonymous RSS growth vs smallest MB | file-mapped RSS growth vs "
              "smallest MB | anonymous RSS - CPU tier MB |")
        print("|" + "---|" * 18)
        for r in results:
            print(f"| {r['n']:,} | {r['startup_s']:.2f} | {r['startup_s'] / small['startup_s']:.2f}x "
                  f"| {r['rss_start_mb']:.0f} | {r['rss_end_mb'] - small['rss_end_mb']:+.0f} "
                  f"| {r['models_s']:.3f} | {r['cold_p50_ms']:.1f} / {r['cold_p99_ms']:.1f} "
                  f"| {r['hot_p50_ms']:.1f} / {r['hot_p99_ms']:.1f} | {r['zipf_tok_s']:.0f} | {r['single_tok_s']:.0f} "
                  f"| {r['zipf_ratio']:.2f}x | {r['disk_loads']} | {r['disk_reloads']} | {r['cpu_tier_mb']:.1f} "
                  f"| {r['rss_end_mb']:.0f} | {r['anon_end_mb'] - small['anon_end_mb']:+.0f} "
                  f"| {r['file_end_mb'] - small['file_end_mb']:+.0f} | {r['anon_end_mb'] - r['cpu_tier_mb']:.0f} |")
        big = results[-1]
        print()
        print(f"targets: start-up {big['startup_s'] / small['startup_s']:.2f}x of the smallest store (<= 1.5x); "
              f"RSS growth {big['rss_end_mb'] - small['rss_end_mb']:.0f} MB (anonymous "
              f"{big['anon_end_mb'] - small['anon_end_mb']:.0f} MB, file-mapped "
              f"{big['file_end_mb'] - small['file_end_mb']:.0f} MB) vs CPU budget {budget} MB "
              f"(+10%: {1.1 * budget:.0f} MB); Zipf({args.zipf}) {big['zipf_ratio']:.2f}x of single (>= 0.8x); "
              f"/v1/models listed {big['models_listed']} adapters with {big['models_bytes_cpu_after']} bytes "
              f"pulled into the CPU tier")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
