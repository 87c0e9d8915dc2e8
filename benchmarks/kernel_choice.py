"""Mixed-batch LoRA kernels against each other, per batch layout: what ``ops.choose_kernel`` picks, and how far
that pick is from the fastest kernel measured in the same run.

For each layout (how many rows use each adapter; rows grouped by adapter or scattered) and phase (prefill: 64
tokens per row; decode: 1), the three kernels (sgmv, segbmm, bgmv) run on the seven Llama target shapes of a
hidden-1024 model (r=16), adding into an existing output as the runtime does under ``torch.no_grad``. Printed:
each kernel's time as a ratio to the fastest one, the automatic pick, and its ratio ("auto / best").

    python benchmarks/kernel_choice.py              # ~1 min on 2 CPU cores
    python benchmarks/kernel_choice.py --quick      # hidden 256, smoke test
"""

from __future__ import annotations

import argparse
import random

import torch
from timing import timeit_interleaved, add_malloc_option, tune_host  # benchmarks/timing.py

from loraplex import ops

LAYOUTS: dict[str, list[int]] = {  # rows per adapter
    "16 adapters x 1 row": [1] * 16,
    "8 x 2": [2] * 8,
    "2 x 8": [8, 8],
    "zipf 6,3,2,2,1,1,1": [6, 3, 2, 2, 1, 1, 1],
    "12 + 4": [12, 4],
    "10 + 4 + 2": [10, 4, 2],
    "5 + 11 x 1": [5] + [1] * 11,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64, help="tokens per row in the prefill phase")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_malloc_option(ap)
    args = ap.parse_args()
    tune_host(args)
    if args.quick:
        args.hidden, args.repeats = 256, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    h, ff, kv = args.hidden, int(args.hidden * 2.6875), args.hidden // 4
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)]  # q k v o gate up down
    n_slots = max(len(c) for c in LAYOUTS.values()) + 1
    factors = [(torch.randn(n_slots, args.rank, i, device=dev) * 0.02, torch.randn(n_slots, o, args.rank, device=dev)
                * 0.02) for i, o in shapes]
    scale = torch.full((n_slots,), 2.0, device=dev)
    scale[0] = 0
    kernels = {"sgmv": ops.lora_sgmv, "segbmm": ops.lora_segbmm, "bgmv": ops.lora_bgmv}
    print(f"# kernels: hidden={h} r={args.rank} 7 targets, 16 rows, device={dev} threads={torch.get_num_threads()}")
    print()
    print("| phase | layout | rows | sgmv (x best) | segbmm (x best) | bgmv (x best) | auto picks | auto / best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = 1.0
    for phase, length in (("prefill", args.seq), ("decode", 1)):
        for name, counts in LAYOUTS.items():
            for order in ("grouped", "scattered"):
                slots = [k + 1 for k, c in enumerate(counts) for _ in range(c)]
                if order == "scattered":
                    random.Random(0).shuffle(slots)
                n = len(slots)
                seg = ops.make_segments(torch.arange(n), torch.tensor(slots), torch.ones(n), n, device=dev)
                xs = [torch.randn(n, length, i, device=dev) for i, _ in shapes]
                ys = [torch.zeros(n, length, o, device=dev) for _, o in shapes]

                def run(fn):
                    def go():
                        for x, y, (A, B) in zip(xs, ys, factors):
                            fn(x, A, B, scale, seg, out=y)
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                    return go
                with torch.no_grad():
                    t = timeit_interleaved({k: run(fn) for k, fn in kernels.items()}, args.repeats)
                best = min(t.values())
                pick = ops.choose_kernel(seg, length)
                worst = max(worst, t[pick] / best)
                cells = " | ".join(f"{t[k] / best:.2f}" for k in kernels)
                print(f"| {phase} | {name} | {order} | {cells} | {pick} | {t[pick] / best:.2f} |")
    print(f"\nworst auto / best over all layouts: {worst:.2f}x")


if __name__ == "__main__":
    main()
