"""Joint mixed-batch training of K LoRA adapters vs training them one after another (same code, same data).

Both modes run ``loraplex.train.train`` on the same config: ``joint`` puts one micro-batch of every adapter into ONE
mixed batch per step (one frozen-base forward/backward, per-adapter losses and optimizers); ``sequential``
(``trainer.joint: false``) trains the K adapters in K separate runs. Each adapter sees the same data in the same
order and the same updates in both modes, so final losses must agree within noise (LoRA dropout draws differ).

Model: Llama-shaped, all 7 linear targets, r=16: synthetic (random init, a vocab-4096 word-level tokenizer built
from the data) or, with ``--model smollm2``, the real SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3, its
own 49,152-token tokenizer; a row of ``--seq-len`` words is then cut at ``--seq-len`` + 8 tokens).
Data: real text that ships with the machine, one domain per adapter (Python stdlib sources, stdlib docstrings,
C headers or more stdlib, licence texts), as plain-text causal LM rows.

    flock /tmp/bench.lock python benchmarks/train.py           # K=4, hidden 128, 2 layers, 12 steps (a few minutes)
    flock /tmp/bench.lock python benchmarks/train.py --full    # hidden 256, 4 layers, 24 steps
    python benchmarks/train.py --quick                         # tiny, a smoke test
    flock /tmp/bench.lock python benchmarks/train.py --model smollm2           # the real SmolLM2, 12 steps
    python benchmarks/train.py --model smollm2 --quick         # 4 steps of 16 words, smoke test

Reported per mode: wall-clock tokens/s of the training loops and of the whole ``train`` calls (model loading,
tokenizing and saving included), and tokens per CPU-second of the training loops (process CPU time, which a busy
shared machine distorts far less than wall time).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from models import (LLAMA_TARGETS, add_model_options, check_model_options, describe,  # benchmarks/models.py
                    is_real, smollm2_folder, synthetic_config)
from timing import add_malloc_option, tune_host  # benchmarks/timing.py


# ------------------------------------------------------------------------------------------ data from the machine
def _files(pattern_dirs: list[tuple[str, str]], limit: int) -> list[Path]:
    out: list[Path] = []
    for folder, glob in pattern_dirs:
        d = Path(folder)
        if d.is_dir():
            out += sorted(p for p in d.glob(glob) if p.is_file())
        if len(out) >= limit:
            break
    return out[:limit]


def _chunks(text: str, words: int) -> list[str]:
    toks = text.split()
    return [" ".join(toks[i:i + words]) for i in range(0, len(toks) - words + 1, words)]


def domain_texts(n_rows: int, words: int) -> dict[str, list[str]]:
    """Rows of ``words`` words per domain, from text installed on this machine."""
    stdlib = sysconfig.get_paths()["stdlib"]

    def read(paths: list[Path]) -> str:
        parts = []
        for p in paths:
            try:
                parts.append(p.read_text(encoding="utf-8", errors="ignore"))
            except OSError:
                continue
        return "\n".join(parts)

    def docstrings(paths: list[Path]) -> str:
        out = []
        for p in paths:
            try:
                tree = ast.parse(p.read_text(encoding="utf-8", errors="ignore"))
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        out.append(doc)
        return "\n".join(out)

    sources = {
        "code": lambda: read(_files([(stdlib, "*.py")], 40)),
        "docs": lambda: docstrings(_files([(stdlib, "*.py")], 200)),
        "headers": lambda: read(_files([("/usr/include", "*.h"), (os.path.join(stdlib, "email"), "*.py")], 60)),
        "licences": lambda: read(_files([("/usr/share/common-licenses", "*"), ("/usr/share/doc", "*/copyright"),
                                         (os.path.join(stdlib, "json"), "*.py")], 60)),
        "asyncio": lambda: read(_files([(os.path.join(stdlib, "asyncio"), "*.py")], 40)),
        "http": lambda: read(_files([(os.path.join(stdlib, "http"), "*.py"), (os.path.join(stdlib, "xml"), "**/*.py")],
                                    40)),
    }
    out: dict[str, list[str]] = {}
    for name, make in sources.items():
        rows = _chunks(make(), words)
        if len(rows) >= n_rows:
            out[name] = rows[:n_rows]
    return out


def build_tokenizer(texts: list[str], vocab: int, folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab,
                                                             special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    fast.save_pretrained(folder)
    return fast


# ------------------------------------------------------------------------------------------ the benchmark
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=4)
    add_model_options(ap, hidden=128, layers=2)
    ap.add_argument("--batch-size", type=int, default=4, help="rows per adapter per step")
    ap.add_argument("--seq-len", type=int, default=32, help="words per row (~tokens)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per adapter")
    ap.add_argument("--vocab", type=int, default=4096, help="synthetic model's word-level vocabulary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternate joint/sequential runs; best of each")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--full", action="store_true",
                    help="24 steps of 64 words (synthetic model: hidden 256, 4 layers)")
    ap.add_argument("--json", help="also write the results here")
    add_malloc_option(ap)
    args = ap.parse_args()
    check_model_options(ap, args)
    tune_host(args)
    if args.quick:
        args.steps, args.seq_len = 4, 16
    elif args.full:
        args.steps, args.seq_len = 24, 64
    if not is_real(args) and (args.quick or args.full):
        args.hidden, args.layers = (64, 2) if args.quick else (256, 4)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from loraplex.config import load_config
    from loraplex.train.trainer import train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    n_rows = args.steps * args.batch_size
    texts = domain_texts(n_rows, args.seq_len)
    if len(texts) < args.adapters:
        sys.exit(f"only {len(texts)} text domains found on this machine ({', '.join(texts)}); need {args.adapters}")
    names = list(texts)[: args.adapters]
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-train-") as tmp:
        work = Path(tmp)
        if is_real(args):
            base = Path(smollm2_folder())
            tok, cfg = AutoTokenizer.from_pretrained(base), AutoConfig.from_pretrained(base)
        else:
            base = work / "base"
            tok = build_tokenizer([t for n in names for t in texts[n]], args.vocab, base)
            torch.manual_seed(0)
            cfg = synthetic_config(args, vocab_size=len(tok), num_key_value_heads=max(args.hidden // 64, 1),
                                   max_position_embeddings=4 * args.seq_len, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   tie_word_embeddings=False)
            LlamaForCausalLM(cfg).save_pretrained(base)
        for n in names:
            with open(work / f"{n}.jsonl", "w") as fh:
                for t in texts[n]:
                    fh.write(json.dumps({"text": t}) + "\n")
        raw = {
            "base_model": str(base), "model_type": "llm",
            "adapters": {"adapters": {n: {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05,
                                          "target_modules": list(LLAMA_TARGETS), "dataset": f"{n}.jsonl"}
                                      for n in names}},
            "trainer": {"epochs": 1, "learning_rate": 2e-3, "batch_size": args.batch_size,
                        "max_length": args.seq_len + 8, "max_steps": args.steps, "seed": 0},
        }
        config = load_config(raw, base_dir=work)
        results: dict[str, list[dict]] = {"joint": [], "sequential": []}
        for rep in range(args.repeats):
            for mode in ("joint", "sequential") if rep % 2 == 0 else ("sequential", "joint"):
                out = work / f"run-{mode}-{rep}"
                groups = [names] if mode == "joint" else [[n] for n in names]  # 1 run, or K separate runs
                rec = {"tokens": 0, "train_s": 0.0, "cpu_s": 0.0, "wall_s": 0.0, "losses": {}}
                for only in groups:
                    t0 = time.perf_counter()
                    res = train(config, output_dir=out, only=only, joint=mode == "joint", progress=False,
                                device=args.device, log=lambda m: None)
                    rec["wall_s"] += time.perf_counter() - t0
                    rec["tokens"] += res.tokens
                    rec["train_s"] += res.train_seconds
                    rec["cpu_s"] += res.train_cpu_seconds
                    rec["losses"].update({n: res.losses[n][-1] for n in only})
                    rec["first"] = {**rec.get("first", {}), **{n: res.losses[n][0] for n in only}}
                results[mode].append(rec)
                print(f"  {mode:10s} repeat {rep + 1}: {rec['tokens']} tokens, training loop {rec['train_s']:.1f}s "
                      f"({rec['tokens'] / rec['train_s']:.0f} tok/s, {rec['cpu_s']:.1f} CPU-s), end to end "
                      f"{rec['wall_s']:.1f}s", file=sys.stderr)
        best = {m: min(v, key=lambda r: r["train_s"]) for m, v in results.items()}
        j, s = best["joint"], best["sequential"]
        ratio = s["train_s"] / j["train_s"]
        ratio_e2e = s["wall_s"] / j["wall_s"]
        ratio_cpu = s["cpu_s"] / j["cpu_s"]
        try:
            load = "load average %.1f" % os.getloadavg()[0]
        except OSError:
            load = "load average n/a"
        print(f"\n### Joint mixed-batch vs sequential LoRA training (K={args.adapters})\n")
        print(f"{describe(args, cfg)}; r={args.rank} on {len(LLAMA_TARGETS)} linear targets; {args.batch_size} "
              f"rows x <={args.seq_len + 8} tokens per adapter per step, {args.steps} steps per adapter; {args.device}, {torch.get_num_threads()} threads, {load}, "
              f"best of {args.repeats}.\n")
        print("| mode | runs | tokens | training loop (s) | tokens/s | tokens/CPU-s | end to end (s) | e2e tokens/s | "
              + " | ".join(f"final loss {n}" for n in names) + " |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names))
        for mode, r in best.items():
            losses = " | ".join(f"{r['losses'][n]:.4f}" for n in names)
            print(f"| {mode} | {1 if mode == 'joint' else len(names)} | {r['tokens']} | {r['train_s']:.1f} | "
                  f"{r['tokens'] / r['train_s']:.0f} | {r['tokens'] / r['cpu_s']:.0f} | {r['wall_s']:.1f} | "
                  f"{r['tokens'] / r['wall_s']:.0f} | {losses} |")
        diffs = [abs(j["losses"][n] - s["losses"][n]) for n in names]
        drop = min(j["first"][n] - j["losses"][n] for n in names)
        print(f"\njoint / sequential tokens/s: training loop **{ratio:.2f}x** wall, **{ratio_cpu:.2f}x** per CPU-second; "
              f"end to end (model loading, tokenizing, saving included) **{ratio_e2e:.2f}x** (target >= 1.5x). "
              f"Max |final loss difference| {max(diffs):.4f} (smallest drop of an adapter's loss from its first to its "
              f"last step: {drop:.3f}).")
        if args.json:
            Path(args.json).write_text(json.dumps({"ratio_train_loop": ratio, "ratio_end_to_end": ratio_e2e,
                                                   "ratio_cpu": ratio_cpu,
                                                   "args": vars(args), "joint": j, "sequential": s}, indent=2))


if __name__ == "__main__":
    main()
