"""Merge cost and accuracy: loraplex ``merge_adapters`` vs PEFT ``add_weighted_adapter`` on the same adapters.

Llama-shaped random-init model (default hidden 768, intermediate 2048, 2 layers: 14 target modules), 3 PEFT
adapters of rank 16 on all 7 linear targets, weights 0.5/0.3/0.2 (not normalised), density 0.5. For every
combination type it prints, for loraplex and for PEFT: peak extra memory (pass 1: process RSS above the level just
before the call, sampled every 1 ms by a thread through psutil, with glibc told to return freed blocks >= 256 KiB to
the OS at once so the peak is visible), wall time (pass 2: plain calls, glibc then told to keep freed blocks for
reuse as its dynamic threshold would, no sampling thread), the rank
written, and the relative Frobenius error of the merged delta against the exact weighted sum of deltas
``sum_i w_i s_i B_i A_i`` over all modules (``err vs sum``). For loraplex it also prints the truncation error
against the method's own definition (``trunc err``: 0 for exact cat/linear; for ties/dare/magnitude the
difference to the weighted sum is the method itself, not an error). Finally it shows what PEFT does with adapters of
different ranks for its factor-wise types.

    python benchmarks/merge.py            # default size (~3-4 min on 2 busy CPU cores, one torch thread)
    python benchmarks/merge.py --quick    # small model, smoke test (~30 s)
    python benchmarks/merge.py --hidden 1024 --intermediate 2752 --layers 4   # bigger (PEFT's *_svd get slow)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex import load_adapter
from loraplex.merge import MERGE_METHODS, merge_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_TYPES = {"svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
              "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"}


# --------------------------------------------------------------------------- measuring
def _malloc_release() -> None:
    """Make glibc mmap (and so unmap on free) blocks >= 256 KiB, so RSS follows tensor allocations."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _malloc_keep() -> None:
    """Make glibc keep freed blocks up to 32 MiB in its heap for reuse (what its dynamic threshold converges to),
    so timings do not pay a page fault per fresh buffer."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of ``fn()``, with nothing else running in the process."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra RSS in MiB) of ``fn()``; the seconds include the sampling overhead."""
    gc.collect()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return out, dt, (peak[0] - base) / 2**20


class ErrorMeter:
    """Relative Frobenius error over all modules against the exact weighted sum of the source deltas."""

    def __init__(self, adapters: dict, names: list[str], weights: list[float]) -> None:
        self.adapters, self.names, self.weights = adapters, names, weights
        self.modules = sorted({m for n in names for m in adapters[n].modules})

    def exact(self, mod: str) -> torch.Tensor:
        out = None
        for n, w in zip(self.names, self.weights):
            m = self.adapters[n].modules.get(mod)
            if m is not None:
                d = w * m.delta()
                out = d if out is None else out + d
        return out

    def error(self, merged_delta: Callable[[str], torch.Tensor]) -> float:
        num = den = 0.0
        for mod in self.modules:
            want = self.exact(mod)
            num += float((merged_delta(mod) - want).norm()) ** 2
            den += float(want.norm()) ** 2
        return math.sqrt(num / den)


# --------------------------------------------------------------------------- setup
def build(args: argparse.Namespace, root: Path) -> tuple[LlamaForCausalLM, dict[str, Path]]:
    cfg = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=256)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    paths = {}
    for i in range(args.adapters):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                            target_modules=TARGETS, init_lora_weights=False))
        with torch.no_grad():  # B ~ N(0, 0.02), like a trained adapter's scale; A keeps PEFT's kaiming init
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        paths[f"a{i}"] = Path(root) / f"a{i}"
        pm.save_pretrained(str(paths[f"a{i}"]))
        del pm
    return base, paths


def peft_delta_fn(pm: PeftModel, adapter: str) -> Callable[[str], torch.Tensor]:
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}

    def fn(mod: str) -> torch.Tensor:
        layer = layers[mod]
        A = layer.lora_A[adapter].weight.detach()
        B = layer.lora_B[adapter].weight.detach()
        return layer.scaling[adapter] * (B @ A)

    return fn


def peft_kwargs(method: str, density: float) -> dict[str, Any]:
    return {"density": density} if method not in ("linear", "cat", "svd") else {}


def peft_rank(pm: PeftModel, adapter: str) -> int:
    return int(pm.peft_config[adapter].r)


def mixed_rank_probe(root: Path) -> tuple[str, str]:
    """What PEFT and loraplex do with a linear merge of adapters of ranks 8 and 16."""
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    base = LlamaForCausalLM(cfg).eval()
    paths = {}
    for name, r in (("r8", 8), ("r16", 16)):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, target_modules=TARGETS, init_lora_weights=False))
        paths[name] = root / name
        pm.save_pretrained(str(paths[name]))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["r8"]), adapter_name="r8")
    pm.load_adapter(str(paths["r16"]), adapter_name="r16")
    try:
        pm.add_weighted_adapter(["r8", "r16"], [0.5, 0.5], "m", combination_type="linear")
        peft_msg = "ok"
    except ValueError as exc:
        peft_msg = f"ValueError: {exc}"
    ads = {n: load_adapter(p, n) for n, p in paths.items()}
    _, rep = merge_adapters(ads, ["r8", "r16"], [0.5, 0.5], "linear")
    ours = f"ok: exact (cat), rank {rep.modules[0].rank} per module, rel error {rep.max_error:.1e}"
    return peft_msg, ours


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 256, intermediate 688, 2 layers")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--methods", default=",".join(MERGE_METHODS), help="comma-separated combination types")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT add_weighted_adapter")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers = 256, 688, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    _malloc_release()
    torch.linalg.svd(torch.randn(64, 32))  # load LAPACK outside the timings
    torch.svd_lowrank(torch.randn(64, 32), q=4)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    weights = [0.5, 0.3, 0.2] if args.adapters == 3 else [1.0 / args.adapters] * args.adapters

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base, paths = build(args, root)
        names = list(paths)
        ads = {n: load_adapter(p, n) for n, p in paths.items()}
        meter = ErrorMeter(ads, names, weights)
        pm = None
        if not args.no_peft:
            pm = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[names[0]]), adapter_name=names[0])
            for n in names[1:]:
                pm.load_adapter(str(paths[n]), adapter_name=n)
        setup_s = time.perf_counter() - t0
        n_mod = len(meter.modules)
        print(f"# merge benchmark: Llama-shaped hidden {args.hidden}, intermediate {args.intermediate}, "
              f"{args.layers} layers, {n_mod} target modules; {len(names)} adapters r={args.rank} on {len(TARGETS)} "
              f"targets; weights {weights}; density {args.density}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads (setup {setup_s:.1f} s)\n")
        rows = []
        peak: dict[tuple[str, str], float] = {}
        # pass 1: peak memory (RSS sampled every 1 ms; glibc returns freed blocks >= 256 KiB at once, set at start)
        for method in methods:
            _, _, peak["ours", method] = measure(lambda: merge_adapters(ads, names, weights, method,
                                                                        density=args.density, normalize=False))
            if pm is not None and method in PEFT_TYPES:
                tag = f"m_{method}"
                try:
                    _, _, peak["peft", method] = measure(lambda: pm.add_weighted_adapter(
                        names, weights, tag, combination_type=method, **peft_kwargs(method, args.density)))
                    pm.delete_adapter(tag)
                except Exception:  # reported in pass 2
                    pass
            gc.collect()
        # pass 2: time and accuracy, glibc keeping freed blocks for reuse, no sampling thread
        _malloc_keep()
        for method in methods:
            (merged, report), dt = timed(lambda: merge_adapters(ads, names, weights, method,
                                                                density=args.density, normalize=False))
            ours_err = meter.error(lambda mod: merged.modules[mod].scaling * (merged.modules[mod].B
                                                                              @ merged.modules[mod].A))
            ranks = sorted({m.rank for m in report.modules})
            row = {"method": method, "ours_s": dt, "ours_mb": peak["ours", method],
                   "ours_rank": "/".join(map(str, ranks)), "ours_err": ours_err, "trunc": report.total_error,
                   "peft": None}
            del merged
            if pm is not None and method in PEFT_TYPES:
                tag = f"m_{method}"
                try:
                    _, pdt = timed(lambda: pm.add_weighted_adapter(names, weights, tag, combination_type=method,
                                                                   **peft_kwargs(method, args.density)))
                    perr = meter.error(peft_delta_fn(pm, tag))
                    row["peft"] = {"s": pdt, "mb": peak.get(("peft", method), float("nan")),
                                   "rank": str(peft_rank(pm, tag)), "err": perr}
                    pm.delete_adapter(tag)
                except Exception as exc:  # PEFT refusing a combination is a result too
                    row["peft"] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(f"  {method}: ours {dt:.2f} s" + (f", PEFT {row['peft']['s']:.2f} s"
                                                    if row["peft"] and "s" in row["peft"] else ""), flush=True)

        print("\n| method | loraplex s | loraplex peak MiB | loraplex rank | loraplex err vs sum | loraplex trunc err "
              "| PEFT s | PEFT peak MiB | PEFT rank | PEFT err vs sum |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            p = r["peft"]
            if p is None:
                ptxt = "n/a | n/a | n/a | n/a"
            elif "error" in p:
                ptxt = f"{p['error'][:60]} | | |"
            else:
                ptxt = f"{p['s']:.2f} | {p['mb']:.0f} | {p['rank']} | {p['err']:.3e}"
            print(f"| {r['method']} | {r['ours_s']:.2f} | {r['ours_mb']:.0f} | {r['ours_rank']} | {r['ours_err']:.3e} "
                  f"| {r['trunc']:.3e} | {ptxt} |")
        peft_msg, ours_msg = mixed_rank_probe(root)
        print(f"\nmixed ranks (8 and 16), linear: PEFT -> {peft_msg}\n                                 loraplex -> "
              f"{ours_msg}")
        print("\nerr vs sum: ||merged delta - sum_i w_i s_i B_i A_i||_F / ||sum||_F over all modules. For ties/dare/"
              "magnitude types the difference is mostly the method itself (pruning); 'trunc err' is loraplex's "
              "SVD error against its own definition. PEFT's non-svd types merge A and B separately (rank r).")


if __name__ == "__main__":
    main()
