"""Serving under a bounded load: throughput and latency of the loraplex server over HTTP.

A Llama-shaped model (synthetic: random init of ``--hidden`` / ``--layers``, MiniLM tokenizer so prompts are real
text; or ``--model smollm2``: the real SmolLM2-135M-Instruct with its own tokenizer, 30 layers, hidden 576, GQA
9/3, vocab 49,152), 8 LoRA adapters (r=16, all 7 linear targets, random non-zero weights written by PEFT). 200 completion requests from 16 concurrent clients, every request generating exactly
``--max-tokens`` tokens (greedy, ``ignore_eos``) so all scenarios do the same work:

* ``base``           - no adapter (reference for the LoRA overhead)
* ``single``         - all requests on one adapter
* ``mixed-uniform``  - each request picks one of 8 adapters uniformly
* ``mixed-zipf``     - skewed popularity (Zipf, s=1.2)
* ``mixed-logprobs`` - the mixed-uniform load with ``logprobs: 5`` (each token's logprob and its top-5
  alternatives, what scoring and eval clients ask for); reported as a ratio to ``mixed-uniform`` (target >= 0.9x)
* ``auto``           - ``model: "auto"``: a linear router over the base model's last hidden state (a routing pass
  per prompt, loraplex.compose.RoutedModel) picks each request's adapter; the prompts of requests that arrive
  while the engine is busy are routed in one batched pass
* ``auto-per-request`` - the same router, one routing forward per request (the server's behaviour before the
  batched routing)
* ``naive-switch``   - the mixed-uniform load against a naive server: a lock, ``plex.active = adapter`` and
  ``plex.generate`` one request at a time (what a single-adapter server does when asked to switch per request);
  it serves one request at a time, so ``--naive-requests`` (64) of them measure its rate

Servers run in-process on loopback (uvicorn on a thread); clients are asyncio httpx tasks. The batched scenarios
run in ``--rounds`` interleaved rounds (each a slice of the scenario's requests) and the median round is
reported, so a burst of load from other processes does not decide a ratio; tokens per CPU-second of the process
are reported too. Prints a markdown table and asserts that no request failed.

    python benchmarks/serve.py                    # ~2-3 min on 2 CPU cores
    python benchmarks/serve.py --quick            # smaller model and load, smoke test
    python benchmarks/serve.py --model smollm2    # the real SmolLM2 shapes and weights
    python benchmarks/serve.py --model smollm2 --quick   # 32 requests of 16 tokens, smoke test
    python benchmarks/serve.py --scenarios mixed-uniform,mixed-logprobs --rounds 8   # one ratio, more rounds
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from models import LLAMA_TARGETS, add_model_options, check_model_options, describe, is_real, smollm2_folder
from timing import add_malloc_option, tune_host  # benchmarks/timing.py

import loraplex
from loraplex.compose import RoutedModel
from loraplex.compose.router import build_router
from loraplex.serve import Engine, ModelRegistry, ServerThread, create_app
from loraplex.serve.testing import peft_adapters, tiny_llama

SENTENCES = [
    "The standard library ships a module for reading and writing CSV files.",
    "Return a new list containing all items from the iterable in ascending order.",
    "A context manager ensures the file is closed when the block exits, even on errors.",
    "Once upon a time in a quiet village near the mountains there lived an old clockmaker",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "The meeting has been moved to Thursday afternoon because the projector is broken.",
    "Translate the following sentence into French: where is the train station?",
    "Summarize: the quarterly report shows revenue growth in every region except the north.",
]


def make_prompts(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        k = rng.randint(1, 3)
        out.append(" ".join(rng.choice(SENTENCES) for _ in range(k)))
    return out


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(w)
    return [x / total for x in w]


# --------------------------------------------------------------------------- the naive baseline server
def naive_app(plex: loraplex.Plex):
    """One request at a time under a lock: switch ``plex.active`` to the request's adapter, ``generate``."""
    from fastapi import FastAPI

    app = FastAPI()
    lock = threading.Lock()
    tok = plex.tokenizer

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:  # a sync endpoint: runs on the thread pool, serialised by the lock
        model = body["model"]
        n = int(body.get("max_tokens", 16))
        ids = torch.tensor([tok(body["prompt"]).input_ids])
        with lock:
            plex.active = None if model == "base" else model
            out = plex.generate(ids, max_new_tokens=n, min_new_tokens=n if body.get("ignore_eos") else 0,
                                do_sample=False, pad_token_id=tok.pad_token_id)
        gen = out[0, ids.shape[1]:].tolist()
        return {"choices": [{"index": 0, "text": tok.decode(gen, skip_special_tokens=True),
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(gen)}}

    return app


# --------------------------------------------------------------------------- load generator
async def run_load(url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int,
                   extra: dict | None = None) -> dict:
    """Send every request (``models[i]``, ``prompts[i]``, plus the fields of ``extra``) with ``concurrency``
    clients; latencies and totals."""
    latencies: list[float] = []
    failures: list[str] = []
    tokens = 0
    nxt = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal nxt, tokens
        while nxt < len(models):
            i = nxt
            nxt += 1
            payload = {"model": models[i], "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, **(extra or {})}
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", json=payload)
            except httpx.HTTPError as exc:
                failures.append(f"{models[i]}: {exc!r}")
                continue
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                failures.append(f"{models[i]}: HTTP {r.status_code} {r.text[:200]}")
                continue
            body = r.json()
            lp = body["choices"][0].get("logprobs")
            if extra and extra.get("logprobs") and (not lp or len(lp["top_logprobs"]) != max_tokens):
                failures.append(f"{models[i]}: logprobs missing or short")
                continue
            tokens += body["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"requests": len(models), "failures": failures, "wall": wall, "cpu": cpu, "tokens": tokens,
            "latencies": latencies, "rps": len(latencies) / wall, "tps": tokens / wall}


def summarize(parts: list[dict]) -> dict:
    """One scenario over its rounds: median round throughput, pooled latency percentiles, CPU efficiency."""
    lat = sorted(x for p in parts for x in p["latencies"])
    tokens, cpu = sum(p["tokens"] for p in parts), sum(p["cpu"] for p in parts)
    return {"rps": statistics.median(p["rps"] for p in parts), "tps": statistics.median(p["tps"] for p in parts),
            "p50": statistics.median(lat) if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] if lat else float("nan"),
            "tok_per_cpu_s": tokens / cpu if cpu > 0 else float("nan"), "requests": len(lat),
            "failures": [f for p in parts for f in p["failures"]]}


class PerRequestRouting:
    """The old `auto` path, for comparison: every request's prompt routed alone, on the engine's worker."""

    def __init__(self, registry: ModelRegistry, engine: Engine) -> None:
        self.registry, self.engine = registry, engine
        self.batch_sizes: list[int] = []

    def submit(self, prompt: str) -> object:
        self.batch_sizes.append(1)
        return self.engine.call_on_worker(lambda: self.registry.route_prompts([prompt]))[0]


def _hist(h, phase: str) -> tuple[int, float]:
    """(count, sum) of a batch-size histogram phase."""
    with h._lock:
        got = h._values.get((phase,))
    return (int(got[0][-1]), float(got[1])) if got else (0, 0.0)


def _delta(now: tuple[int, float], before: tuple[int, float]) -> tuple[int, float]:
    return now[0] - before[0], now[1] - before[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    add_model_options(ap, hidden=384, layers=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 default: on a shared box, 2 threads stall on contention)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--naive-requests", type=int, default=64,
                    help="requests for the naive server (it serves one at a time, so its rate is stable)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="each scenario's requests are split into this many interleaved rounds; throughput is the "
                         "median round (robust to other processes stealing the CPU)")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated scenarios to run (default: all); single and the ratios' operands are "
                         "added as needed")
    ap.add_argument("--seed", type=int, default=0)
    add_malloc_option(ap)
    args = ap.parse_args()
    check_model_options(ap, args)
    tune_host(args)
    if args.quick:
        args.requests, args.max_tokens, args.naive_requests, args.rounds = 48, 16, 16, 1
        if is_real(args):  # fixed shapes: a smaller load instead
            args.requests = 32
        else:
            args.hidden, args.layers = 128, 2
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    names = [f"lora{i}" for i in range(args.adapters)]

    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        t0 = time.perf_counter()
        if is_real(args):
            base = Path(smollm2_folder())
        else:
            base = tiny_llama(Path(tmp) / "base", hidden=args.hidden, layers=args.layers,
                              heads=max(2, args.hidden // 64), kv_heads=max(1, args.hidden // 192),
                              intermediate=int(args.hidden * 2.6875), seed=args.seed)
        paths = peft_adapters(base, Path(tmp) / "adapters", names, r=args.rank, alpha=2 * args.rank,
                              targets=LLAMA_TARGETS)
        plex = loraplex.load(base, adapters=paths)
        naive_plex = loraplex.load(base, adapters=paths)
        hidden = plex.model.config.hidden_size
        print(f"setup: {time.perf_counter() - t0:.1f}s; {describe(args, plex.model.config)}; r={args.rank} "
              f"adapters={args.adapters} threads={args.threads}\n")

        n = args.requests
        prompts = make_prompts(n, rng)
        zipf = zipf_weights(len(names), 1.2)
        loads = {
            "base": ["base"] * n,
            "single": [names[0]] * n,
            "mixed-uniform": [rng.choice(names) for _ in range(n)],
            "mixed-zipf": rng.choices(names, weights=zipf, k=n),
        }
        loads["mixed-logprobs"] = list(loads["mixed-uniform"])
        extras = {"mixed-logprobs": {"logprobs": 5}}
        loads["auto"] = ["auto"] * n
        loads["auto-per-request"] = ["auto"] * n
        wanted = set(loads) | {"naive-switch"}
        if args.scenarios:
            wanted = {x.strip() for x in args.scenarios.split(",") if x.strip()}
            unknown = wanted - set(loads) - {"naive-switch"}
            if unknown:
                ap.error(f"--scenarios: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join([*loads, 'naive-switch'])}")
            wanted |= {"single", "mixed-uniform"}  # the denominators of the ratios
            loads = {k: v for k, v in loads.items() if k in wanted}
        nn = min(args.naive_requests, n)
        engine = Engine(plex, max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                        max_queue=max(256, n))
        torch.manual_seed(args.seed)
        router = build_router(names, hidden)
        with torch.no_grad():
            router.head[-1].weight.mul_(40.0)  # random but decisive: spread over the adapters
        auto_reg, loop_reg = (ModelRegistry(plex, router=RoutedModel(plex, router)) for _ in range(2))
        auto_app, loop_app = create_app(engine, auto_reg), create_app(engine, loop_reg)
        loop_reg._route_batcher = PerRequestRouting(loop_reg, engine)  # type: ignore[assignment]
        parts: dict[str, list[dict]] = {label: [] for label in loads}
        rounds = max(1, min(args.rounds, n))
        with ServerThread(create_app(engine)) as srv, ServerThread(naive_app(naive_plex)) as naive, \
                ServerThread(auto_app) as auto_srv, ServerThread(loop_app) as loop_srv:
            urls = {"auto": auto_srv.url, "auto-per-request": loop_srv.url}
            warm = [names[i % len(names)] for i in range(2 * args.concurrency)]
            asyncio.run(run_load(srv.url, warm, prompts[:len(warm)], args.concurrency, 4))
            labels = list(loads)
            for rnd in range(rounds):  # interleaved rounds, scenario order rotated: noise hits all alike
                lo, hi = rnd * n // rounds, (rnd + 1) * n // rounds
                for label in labels[rnd % len(labels):] + labels[:rnd % len(labels)]:
                    bs = engine.metrics.batch_size
                    steps0, pre0 = _hist(bs, "decode"), _hist(bs, "prefill")
                    got = asyncio.run(run_load(urls.get(label, srv.url), loads[label][lo:hi], prompts[lo:hi],
                                               args.concurrency, args.max_tokens, extras.get(label)))
                    (ds, dr), (ps, pr) = (_delta(_hist(bs, "decode"), steps0), _delta(_hist(bs, "prefill"), pre0))
                    print(f"  round {rnd + 1} {label:14s} {got['wall']:5.1f}s {got['tps']:6.0f} tok/s  "
                          f"({ds} decode steps x {dr / max(ds, 1):.1f} rows, {ps} prefills x "
                          f"{pr / max(ps, 1):.1f} rows)", flush=True)
                    parts[label].append(got)
            if "naive-switch" in wanted:
                asyncio.run(run_load(naive.url, warm[:4], prompts[:4], 1, 4))
                got = asyncio.run(run_load(naive.url, loads["mixed-uniform"][:nn], prompts[:nn], args.concurrency,
                                           args.max_tokens))
                parts["naive-switch"] = [got]
                print(f"  naive-switch   {got['wall']:5.1f}s {got['tps']:6.0f} tok/s\n", flush=True)
        engine.close()

    results = {label: summarize(p) for label, p in parts.items()}
    single = results["single"]
    print(f"{n} requests per scenario in {rounds} interleaved rounds ({nn} for the naive server), "
          f"{args.concurrency} concurrent clients, {args.max_tokens} tokens each, {args.adapters} adapters, "
          f"max batch {args.max_batch_size}; req/s and tok/s: median over rounds; tok/CPU-s: tokens per second "
          f"of this process's CPU time (insensitive to other processes on the machine)\n")
    print("| scenario | req/s | tok/s | p50 latency (s) | p99 latency (s) | tok/CPU-s | tok/s vs single | "
          "tok/CPU-s vs single |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {r['rps']:.2f} | {r['tps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | "
              f"{r['tok_per_cpu_s']:.0f} | {r['tps'] / single['tps']:.2f}x | "
              f"{r['tok_per_cpu_s'] / single['tok_per_cpu_s']:.2f}x |")

    def verdict(x: float, target: float = 0.95) -> str:
        return "OK" if x >= target else "MISSED"

    print()
    mixes = [results[k] for k in ("mixed-uniform", "mixed-zipf") if k in results]
    mixed = min(r["tps"] for r in mixes) / single["tps"]
    mixed_cpu = min(r["tok_per_cpu_s"] for r in mixes) / single["tok_per_cpu_s"]
    print(f"mixed / single throughput (worse of uniform, zipf; target >= 0.95x, DESIGN.md): {mixed:.2f}x wall-clock "
          f"({verdict(mixed)}), {mixed_cpu:.2f}x per CPU second ({verdict(mixed_cpu)})")
    if "naive-switch" in results:
        speedup = results["mixed-uniform"]["tps"] / results["naive-switch"]["tps"]
        print(f"mixed-uniform vs naive per-request switching: {speedup:.1f}x the throughput")
    if "mixed-logprobs" in results:
        lp_on = results["mixed-logprobs"]["tps"] / results["mixed-uniform"]["tps"]
        lp_on_cpu = results["mixed-logprobs"]["tok_per_cpu_s"] / results["mixed-uniform"]["tok_per_cpu_s"]
        print(f"logprobs on (top-5) / off throughput (mixed-uniform load; target >= 0.9x, DESIGN.md): {lp_on:.2f}x "
              f"wall-clock ({verdict(lp_on, 0.9)}), {lp_on_cpu:.2f}x per CPU second ({verdict(lp_on_cpu, 0.9)})")
    if "auto" in results and "auto-per-request" in results:
        sizes = list(auto_reg._route_batcher.batch_sizes)  # type: ignore[union-attr]
        print(f"auto: {len(sizes)} routing passes for {sum(sizes)} requests (mean "
              f"{sum(sizes) / max(len(sizes), 1):.1f} prompts per pass, largest {max(sizes, default=0)}); auto vs "
              f"auto-per-request: {results['auto']['tps'] / results['auto-per-request']['tps']:.2f}x the "
              f"throughput, auto vs mixed-uniform: {results['auto']['tps'] / results['mixed-uniform']['tps']:.2f}x")
    failed = {k: r["failures"] for k, r in results.items() if r["failures"]}
    assert not failed, f"requests failed: {failed}"
    print(f"no request failed ({sum(r['requests'] for r in results.values())} requests)")


if __name__ == "__main__":
    main()
