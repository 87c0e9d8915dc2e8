"""Adapter switching and registration costs, as ratios measured in one run.

1. Switching (DESIGN.md: "adapter switch < 1 ms"): on a Llama-shaped model with 8 adapters (r=16, all 7 targets),
   one 1x16-token forward with the same adapter every call, vs switching the active adapter before every call
   (resident adapters: a slot index changes), vs switching to an adapter that is not on the device (its factors are
   copied from the CPU tier into a slot), vs the reload design (PEFT ``load_adapter`` from disk, then
   ``set_adapter``). Also the bare ``plex.active = name`` assignment.
2. Registering 1,000 small adapters while serving (DESIGN.md: "without slowdown of unrelated requests"): a serving
   :class:`~loraplex.serve.Engine` runs closed-loop generation requests for one adapter from 8 client threads while
   this thread registers 1,000 small adapters (r=4 on q/v, each read from its own PEFT folder on disk, as the admin
   endpoint does) in chunks; the engine's generated tokens/s during each chunk is compared with a quiet window right
   before it (paired, so machine drift cancels).

    python benchmarks/bank.py            # ~1-2 min on 2 CPU cores
    python benchmarks/bank.py --quick    # smaller, smoke test
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from timing import add_malloc_option, timeit_interleaved, tune_host  # benchmarks/timing.py
from transformers import LlamaConfig, LlamaForCausalLM

import loraplex
from loraplex.serve import Engine, SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _save(base, folder: Path, r: int, targets: list[str], seed: int) -> Path:
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                        init_lora_weights=False))
    pm.save_pretrained(folder)
    return folder


def switching(args, base, tmp: Path) -> None:
    names = [f"a{i}" for i in range(8)]
    paths = {n: _save(base, tmp / n, 16, TARGETS, i) for i, n in enumerate(names)}
    resident = loraplex.load(copy.deepcopy(base), paths, max_slots=8)
    tight = loraplex.load(copy.deepcopy(base), paths, max_slots=2)  # 8 adapters, 2 device slots
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["a0"]), adapter_name="a0").eval()
    ids = torch.randint(3, base.config.vocab_size, (1, 16))
    state = {"i": 0}

    def nxt() -> str:
        state["i"] += 1
        return names[state["i"] % len(names)]

    def same():
        resident.active = "a0"
        return resident(ids)

    def switch_resident():
        resident.active = nxt()
        return resident(ids)

    def switch_cold():  # every call needs a slot load: 8 adapters cycle through 2 slots
        tight.active = nxt()
        return tight(ids)

    def reload():  # the design we avoid: read the adapter from disk on every switch
        name = nxt()
        if name in peft.peft_config and name != "a0":
            peft.delete_adapter(name)
        if name != "a0":
            peft.load_adapter(str(paths[name]), adapter_name=name)
        peft.set_adapter(name)
        return peft(input_ids=ids)

    with torch.no_grad():
        for p in (resident, tight):
            p(ids.expand(2, -1), adapters=names[:2])  # warm
        t = timeit_interleaved({"same adapter": same, "switch (resident)": switch_resident,
                                "switch (CPU tier -> slot)": switch_cold, "switch by reload (PEFT)": reload},
                               args.repeats, ref="same adapter")
    assign = []
    for i in range(2000):
        t0 = time.perf_counter()
        resident.active = names[i % 2]
        assign.append(time.perf_counter() - t0)
    base_t = t["same adapter"]
    print("### Switching the active adapter (1 x 16-token forward per call; ratios: medians of per-round ratios)\n")
    print("| variant | forward (ms) | x same adapter | switch overhead (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for k, v in t.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / base_t:.2f}x | {max(v - base_t, 0) * 1e3:.2f} |")
    print(f"\n`plex.active = name` alone: median {statistics.median(assign) * 1e6:.1f} us "
          f"(target: a switch < 1 ms)\n")


def registering(args, base, tmp: Path) -> None:
    plex = loraplex.load(copy.deepcopy(base), {"a": _save(base, tmp / "serve_a", 16, TARGETS, 0)}, max_slots=8)
    small = _save(base, tmp / "small0", 4, ["q_proj", "v_proj"], 1)
    folders = []
    for i in range(args.register):  # 1,000 folders on disk, read one by one as the admin endpoint does
        folders.append(Path(shutil.copytree(small, tmp / "many" / f"s{i}")))
    engine = Engine(plex, max_batch_size=8, batch_window_ms=2)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompt = list(range(5, 21))
    stop = threading.Event()
    done: list[tuple[float, float]] = []  # (finish time, latency)

    def client():
        while not stop.is_set():
            t0 = time.perf_counter()
            engine.generate(prompt, "a", params, timeout=120)
            done.append((time.perf_counter(), time.perf_counter() - t0))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for c in clients:
        c.start()
    time.sleep(2.0)  # warm up

    gen = engine.metrics.generation_tokens  # counted per decode step: finer than whole requests

    def window(seconds: float) -> tuple[float, float]:
        t0, g0 = time.perf_counter(), gen.value()
        time.sleep(seconds)
        t1 = time.perf_counter()
        lat = [lt for ft, lt in done if t0 <= ft <= t1]
        return (gen.value() - g0) / (t1 - t0), (statistics.quantiles(lat, n=100)[98] if len(lat) > 2 else 0.0)

    reg_times: list[float] = []
    chunks = [folders[i::args.chunks] for i in range(args.chunks)]
    rows = []  # (quiet tokens/s, quiet p99, busy tokens/s, busy p99) per chunk: adjacent windows, paired
    t_reg = 0.0
    for chunk in chunks:
        quiet = window(args.window)
        t0, g0 = time.perf_counter(), gen.value()
        mark = len(done)
        for folder in chunk:
            t1 = time.perf_counter()
            name = folder.name
            ad = loraplex.load_adapter(folder, name)  # disk -> CPU on this thread, as the admin endpoint does
            engine.register_adapter(name, ad)  # the bank change runs on the engine's worker between two steps
            reg_times.append(time.perf_counter() - t1)
        t_chunk = time.perf_counter() - t0
        t_reg += t_chunk
        lat = [lt for _, lt in done[mark:]]
        busy = ((gen.value() - g0) / t_chunk, statistics.quantiles(lat, n=100)[98] if len(lat) > 2 else 0.0)
        rows.append((*quiet, *busy))
    stop.set()
    for c in clients:
        c.join(60)
    engine.close()
    ratios = [b / q for q, _, b, _ in rows]
    print(f"### Registering {args.register} small adapters while serving another adapter\n")
    print(f"{args.chunks} chunks of {len(chunks[0])} registrations, each right after a {args.window:.0f}-second quiet "
          f"window (8 closed-loop clients, {args.tokens} tokens per request)\n")
    print("| chunk | quiet tokens/s | quiet p99 (s) | registering: tokens/s | registering: p99 (s) | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, (q, qp, b, bp) in enumerate(rows):
        print(f"| {k + 1} | {q:.0f} | {qp:.3f} | {b:.0f} | {bp:.3f} | {b / q:.2f}x |")
    print(f"\n{args.register} registrations in {t_reg:.1f} s ({args.register / t_reg:.0f}/s; median "
          f"{statistics.median(reg_times) * 1e3:.1f} ms each, disk read and the wait for a step boundary included); "
          f"{len(plex.adapters)} adapters registered at the end; unrelated throughput while registering: median "
          f"**{statistics.median(ratios):.2f}x** of the adjacent quiet windows (target: no slowdown)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--register", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per serving request")
    ap.add_argument("--window", type=float, default=3.0, help="seconds per quiet measurement window")
    ap.add_argument("--chunks", type=int, default=5, help="registrations are split into this many chunks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for this process (Python's default: 5 ms)")
    add_malloc_option(ap)
    args = ap.parse_args()
    tune_host(args)
    if args.switch_interval_ms is not None:
        import sys

        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.quick:
        args.hidden, args.layers, args.repeats, args.register, args.window, args.chunks = 128, 2, 5, 50, 1.0, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), pad_token_id=0, eos_token_id=2)
    base = LlamaForCausalLM(cfg).eval()
    print(f"# bank: hidden={args.hidden} layers={args.layers} threads={torch.get_num_threads()}\n")
    with tempfile.TemporaryDirectory(prefix="lpx-bank-") as tmp:
        switching(args, base, Path(tmp))
        registering(args, base, Path(tmp))


if __name__ == "__main__":
    main()
