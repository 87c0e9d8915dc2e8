"""``loraplex demo``: the LLM path end to end on the embedded SmolLM2-135M-Instruct.

1. builds three datasets from text on this machine (:mod:`loraplex.demo.llm_data`: Python source, English
   documentation prose, and a chat task naming the language of a code snippet), split by source file;
2. writes a Ludwig-shaped YAML config (``<out>/config.yaml``: three adapters, two merges, a router) and trains the
   three adapters in ONE joint mixed-batch job (:func:`loraplex.train.train`), then the merges (linear and TIES of
   ``code`` + ``docs``) and an n-gram router;
3. evaluates on the held-out files, every variant of a row in ONE mixed batch: base, each adapter, the oracle
   (each row's own adapter), the merges, a delta-level blend of all three and routed top-1, and a two-stage
   pipeline for the task (``code`` continues the snippet, then ``lang`` names its language);
4. serves the run and asks one chat completion per adapter through the official ``openai`` client.

The adapters adapt only the top layers of the model, so the evaluation runs the frozen lower layers once per row
and only the top layers per variant (:func:`top_layers`): the same numbers as full forwards (tested), at a
fraction of the cost. Exact match is scored by teacher forcing: greedy decoding reproduces the reference answer
(eos included) exactly when the argmax at every answer position is the reference token.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from loraplex.demo.llm_data import DOMAINS, build_rows
from loraplex.models import DEFAULT_LLM
from loraplex.tokens import pad_batch, pad_id

#: The two merges of ``code`` + ``docs`` the config asks for.
MERGES = {"code_docs_linear": "linear", "code_docs_ties": "ties"}
#: Rank of each adapter (different ranks share one mixed batch).
RANKS = {"code": 16, "docs": 16, "lang": 8}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: The blend row of the table: all three adapters, one third each, at the delta level.
BLEND = {"code": 1 / 3, "docs": 1 / 3, "lang": 1 / 3}


@dataclass
class DemoSettings:
    """Sizes of one demo run (the defaults fit the 8-minute budget on 2 CPU cores)."""

    train_rows: int = 40  # per adapter
    test_rows: int = 12  # per domain
    epochs: int = 2
    batch_size: int = 2  # rows per adapter per joint step (small: more optimizer steps for the same tokens)
    max_length: int = 80  # tokens per training / evaluation row
    learning_rate: float = 2e-3
    top_layers: int = 4  # LoRA on the model's top N layers only
    router_epochs: int = 30
    pipeline_tokens: int = 12  # tokens stage 1 of the pipeline writes
    chat_tokens: int = 48  # max_tokens of each served chat completion
    seed: int = 0
    base_model: str = DEFAULT_LLM


# ------------------------------------------------------------------------------------------------ config
def write_data(folder: Path, tokenizer: Any, s: DemoSettings) -> dict[str, dict[str, Path]]:
    """The datasets as JSONL files, ``{adapter: {"train": path, "test": path}}``."""
    from loraplex.train.data import write_rows

    rows = build_rows(tokenizer, train_rows=s.train_rows, test_rows=s.test_rows, seed=s.seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {}
    for name, splits in rows.items():
        out[name] = {split: write_rows(folder / f"{name}.{split}.jsonl", r) for split, r in splits.items()}
    return out


def config_dict(data: dict[str, dict[str, Path]], s: DemoSettings, n_layers: int, output_dir: Path) -> dict[str, Any]:
    """The demo's training config (Ludwig's multi-adapter schema plus loraplex's router block)."""
    layers = list(range(n_layers - s.top_layers, n_layers))
    adapters: dict[str, Any] = {}
    for name, kind in DOMAINS.items():
        a: dict[str, Any] = {"type": "lora", "r": RANKS[name], "alpha": 2 * RANKS[name], "dropout": 0.0,
                             "target_modules": TARGETS, "layers_to_transform": layers,
                             "dataset": str(data[name]["train"])}
        if kind == "text":
            a["text_column"] = "text"
        else:
            a.update(prompt_column="prompt", response_column="response")
        adapters[name] = a
    return {
        "base_model": s.base_model,
        "model_type": "llm",
        "output_dir": str(output_dir),
        "adapters": {
            "adapters": adapters,
            "merge": [{"name": n, "sources": ["code", "docs"], "weights": [0.5, 0.5], "combination_type": t,
                       **({"density": 0.5} if t == "ties" else {})} for n, t in MERGES.items()],
            "router": {"type": "linear", "pooling": "ngram", "top_k": 1,
                       "train": {"epochs": s.router_epochs, "learning_rate": 0.05, "batch_size": 16}},
            "active": "code",
        },
        "input_features": [{"name": "prompt", "type": "text"}],
        "output_features": [{"name": "response", "type": "text"}],
        "trainer": {"epochs": s.epochs, "learning_rate": s.learning_rate, "batch_size": s.batch_size,
                    "max_length": s.max_length, "warmup_ratio": 0.1, "seed": s.seed},
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    header = ("# loraplex LLM demo: three LoRA adapters on SmolLM2-135M-Instruct, trained jointly in mixed batches,\n"
              "# two merges of code + docs (linear, TIES) and an n-gram router. Written by `loraplex demo`.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.dump(cfg, Dumper=_PlainDumper, sort_keys=False, width=120))
    return path


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated lists out in full (no ``&id001`` anchors) so the config reads like a hand-written one."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# ------------------------------------------------------------------------------------------------ scoring
class _Boundary(Exception):
    """Stops the base pass once the hidden state entering the first adapted layer exists."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` of a transformers causal LM, with ``layers`` and ``norm``)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__} has no decoder stack with .layers")
    return inner


def boundary_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    start: int) -> torch.Tensor:
    """Hidden state [N, L, H] entering decoder layer ``start``, from a base pass that stops there."""
    layer = decoder_of(model).layers[start]

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Boundary(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Boundary as b:
        return b.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"decoder layer {start} was never reached")


@contextmanager
def top_layers(model: nn.Module, start: int) -> Iterator[nn.Module]:
    """Inside the block the decoder runs only layers ``start..`` and takes their input as ``inputs_embeds``."""
    inner = decoder_of(model)
    full = inner.layers
    inner.layers = nn.ModuleList(list(full)[start:])
    try:
        yield inner
    finally:
        inner.layers = full


@dataclass
class Scored:
    """One (row, variant) result: summed token NLL over the labelled positions, their count, how many the argmax
    got right, and whether all of them were right (= greedy decoding reproduces the reference)."""

    loss_sum: float
    n_tokens: int
    correct: int

    @property
    def exact(self) -> bool:
        return self.correct == self.n_tokens


def score_rows(plex: Any, examples: Sequence[Any], choices: Sequence[Sequence[Any]], *, start: int,
               chunk: int = 4) -> list[list[Scored]]:
    """``[row][variant]`` scores of ``examples`` (tokenized rows with labels) under each variant's per-row choice
    (``choices[v][row]``); each chunk of rows runs the base layers once and all variants in ONE mixed batch."""
    from loraplex.train.data import IGNORE

    model = plex.model
    head = model.get_output_embeddings()
    pad = pad_id(plex.tokenizer, plex.model)
    n_var = len(choices)
    out: list[list[Scored]] = []
    for lo in range(0, len(examples), chunk):
        ex = examples[lo:lo + chunk]
        ids, mask = pad_batch([e.input_ids for e in ex], pad)  # [n, L]
        labels, _ = pad_batch([e.labels for e in ex], IGNORE)  # [n, L], IGNORE where padded
        n = ids.shape[0]
        with torch.no_grad():
            with plex.disabled():
                h = boundary_hidden(model, ids, mask, start)  # [n, L, H]
            rows = [choices[v][lo + i] for v in range(n_var) for i in range(n)]  # variant-major
            with top_layers(model, start) as inner, plex.using(rows, n_rows=n * n_var):
                hid = inner(inputs_embeds=h.repeat(n_var, 1, 1), attention_mask=mask.repeat(n_var, 1),
                            use_cache=False).last_hidden_state  # [V*n, L, H]
            tgt = labels[:, 1:].repeat(n_var, 1)  # [V*n, L-1]: token t+1 is predicted at position t
            pos = tgt != IGNORE
            logits = head(hid[:, :-1][pos]).float()  # [P, vocab]: only the labelled positions
            nll = torch.nn.functional.cross_entropy(logits, tgt[pos], reduction="none")  # [P]
            hit = (logits.argmax(-1) == tgt[pos]).long()  # [P]
            row_of = torch.arange(n_var * n).unsqueeze(1).expand_as(tgt)[pos]  # [P]
            loss_sum = torch.zeros(n_var * n).index_add_(0, row_of, nll)
            count = torch.bincount(row_of, minlength=n_var * n)
            correct = torch.bincount(row_of, weights=hit.double(), minlength=n_var * n)
        for i in range(n):
            out.append([Scored(float(loss_sum[v * n + i]), int(count[v * n + i]), int(correct[v * n + i]))
                        for v in range(n_var)])
    return out


# ------------------------------------------------------------------------------------------------ table
#: Table rows in order: (label, how a row's adapter choice is made).
VARIANTS = ("base", "code", "docs", "lang", "oracle", "code_docs_linear", "code_docs_ties", "blend", "routed",
            "pipeline")
LABELS = {"base": "base model", "code": "adapter code", "docs": "adapter docs", "lang": "adapter lang",
          "oracle": "oracle (own domain's adapter)", "code_docs_linear": "merged code+docs (linear, 0.5/0.5)",
          "code_docs_ties": "merged code+docs (TIES, density 0.5)", "blend": "blend code+docs+lang (1/3 each)",
          "routed": "routed top-1 (n-gram router)", "pipeline": "pipeline: code continues the snippet, then lang"}


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{variant: {domain: {loss, accuracy, rows}}}`` from per-row records: loss is token-weighted mean NLL,
    accuracy is next-token accuracy on text domains and exact match on task domains."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in records:
        a = acc.setdefault(r["variant"], {}).setdefault(r["domain"], [0.0, 0, 0, 0, 0])
        a[0] += r["loss_sum"]
        a[1] += r["n_tokens"]
        a[2] += r["correct"]
        a[3] += int(r["exact"])
        a[4] += 1
    out: dict[str, dict[str, dict[str, float]]] = {}
    for v, doms in acc.items():
        out[v] = {}
        for d, (ls, nt, c, ex, rows) in doms.items():
            task = DOMAINS[d] == "task"
            out[v][d] = {"loss": ls / nt if nt else float("nan"), "accuracy": (ex / rows) if task else c / nt,
                         "rows": rows}
    return out


def format_table(table: dict[str, dict[str, dict[str, float]]], routing_accuracy: float | None = None) -> str:
    """Markdown table: one row per variant, loss and accuracy per domain, and the mean loss vs the oracle."""
    doms = list(DOMAINS)
    cols = []
    for d in doms:
        cols += [f"{d} loss", f"{d} {'exact match' if DOMAINS[d] == 'task' else 'token acc'}"]
    lines = ["| " + " | ".join(["method"] + cols + ["mean loss vs oracle"]) + " |",
             "| " + " | ".join(["---"] * (len(cols) + 2)) + " |"]
    oracle = table.get("oracle", {})
    o_mean = _mean_loss(oracle, doms)
    for v in VARIANTS:
        if v not in table:
            continue
        cells = [LABELS[v]]
        for d in doms:
            m = table[v].get(d)
            if m is None:
                cells += ["-", "-"]
            else:
                cells += ["-" if v == "pipeline" else f"{m['loss']:.3f}", f"{m['accuracy']:.1%}"]
        mean = _mean_loss(table[v], doms)
        cells.append(f"{(mean / o_mean - 1):+.1%}" if mean is not None and o_mean else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if routing_accuracy is not None:
        lines.append("")
        lines.append(f"routing accuracy on held-out rows: {routing_accuracy:.1%}")
    return "\n".join(lines)


def _mean_loss(row: dict[str, dict[str, float]], doms: Sequence[str]) -> float | None:
    if not all(d in row for d in doms):
        return None
    return sum(row[d]["loss"] for d in doms) / len(doms)


def checks(table: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, bool]]:
    """The demo's acceptance lines (measured): each adapter beats the base on its own domain; routed within 2% of
    the oracle; the merges' trade-off."""
    out = []
    for d in DOMAINS:
        base, own = table["base"][d], table[d][d]
        gain = 1 - own["loss"] / base["loss"]
        line = (f"{d}: own adapter loss {own['loss']:.3f} vs base {base['loss']:.3f} ({gain:.1%} lower), "
                f"accuracy {own['accuracy']:.1%} vs {base['accuracy']:.1%}")
        out.append((line, gain >= 0.05))
    doms = list(DOMAINS)
    o, r = _mean_loss(table["oracle"], doms), _mean_loss(table["routed"], doms)
    assert o is not None and r is not None
    worst_acc = max(table["oracle"][d]["accuracy"] - table["routed"][d]["accuracy"] for d in doms)
    line = (f"routed top-1: mean loss {r / o - 1:+.2%} vs the oracle, accuracy at most {worst_acc:.1%} "
            f"below it in any domain")
    out.append((line, r / o - 1 <= 0.02 and worst_acc <= 0.02 + 1e-9))
    for m in MERGES:
        if m in table:
            parts = [f"{d} loss {table[m][d]['loss']:.3f} (own {table[d][d]['loss']:.3f}, base "
                     f"{table['base'][d]['loss']:.3f})" for d in ("code", "docs")]
            out.append((f"{m}: " + "; ".join(parts), True))
    return out


# ------------------------------------------------------------------------------------------------ serving
def serve_chats(plex: Any, questions: dict[str, str], *, max_tokens: int,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One chat completion per adapter through the ``openai`` client against the HTTP app on 127.0.0.1."""
    from openai import OpenAI

    from loraplex.serve import Engine, ModelRegistry, ServerThread, create_app

    engine = Engine(plex, max_batch_size=8, batch_window_ms=5)
    app = create_app(engine, ModelRegistry(plex, base_id="smollm2"), base_id="smollm2")
    served = []
    try:
        with ServerThread(app) as srv:
            client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            for model, question in questions.items():
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=max_tokens, temperature=0)
                extra = getattr(r, "model_extra", None) or {}
                served.append({"model": model, "question": question, "answer": r.choices[0].message.content,
                               "finish_reason": r.choices[0].finish_reason,
                               "prompt_tokens": r.usage.prompt_tokens if r.usage else None,
                               "x_loraplex": extra.get("x_loraplex")})
                log(f"  model={model!r}: {question!r}\n    -> {r.choices[0].message.content!r}")
    finally:
        engine.close()
    return served


# ------------------------------------------------------------------------------------------------ the demo
def run_demo(out_dir: str | os.PathLike[str] = "runs/llm-demo", settings: DemoSettings | None = None, *,
             serve: bool = True, progress: bool | None = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo; returns the summary (also ``<out>/results.json``, ``results.md``, ``eval_rows.jsonl``)."""
    from loraplex.compose.moe import RoutedModel
    from loraplex.compose.router import load_router
    from loraplex.models import resolve
    from loraplex.config import load_config
    from loraplex.train.data import causal_example
    from loraplex.run import load_trained_plex
    from loraplex.train.trainer import train

    s = settings or DemoSettings()
    torch.manual_seed(s.seed)
    out = Path(out_dir).resolve()
    t0, cpu0 = time.perf_counter(), time.process_time()
    times: dict[str, float] = {}
    from transformers import AutoConfig, AutoTokenizer

    base_dir = resolve(s.base_model)
    log(f"[1/5] base model {s.base_model!r} ({base_dir}); datasets from this machine's files -> {out / 'data'}")
    tok = AutoTokenizer.from_pretrained(base_dir)
    n_layers = int(AutoConfig.from_pretrained(base_dir).num_hidden_layers)
    data = write_data(out / "data", tok, s)
    cfg_path = write_config(out / "config.yaml", config_dict(data, s, n_layers, out))
    times["setup"] = time.perf_counter() - t0

    log(f"[2/5] training {', '.join(DOMAINS)} jointly in mixed batches (LoRA on the top {s.top_layers} of "
        f"{n_layers} layers), then merges {', '.join(MERGES)} and the router ({cfg_path})")
    t = time.perf_counter()
    result = train(cfg_path, progress=progress, log=log, force=True)
    times["train"] = time.perf_counter() - t
    config = load_config(cfg_path)
    plex = load_trained_plex(config, out)

    log("[3/5] evaluating on held-out files: every variant of a row in one mixed batch")
    t = time.perf_counter()
    rows = {d: _read(data[d]["test"]) for d in DOMAINS}
    examples, meta = [], []
    for d in DOMAINS:
        for i, r in enumerate(rows[d]):
            e = causal_example(tok, r.get("prompt"), r.get("response", r.get("text")), s.max_length, i)
            if e is not None:
                examples.append(e)
                meta.append((d, i, r.get("prompt") or r["text"]))
    router = load_router(out / "router", expected=list(DOMAINS))
    routed = RoutedModel(plex, router)
    picks = routed.route(texts=[m[2] for m in meta]).choices()  # the text each expert's router rows were
    choices: dict[str, list[Any]] = {"base": [None] * len(meta)}
    for name in DOMAINS:
        choices[name] = [name] * len(meta)
    for m in MERGES:
        choices[m] = [m] * len(meta)
    choices["blend"] = [dict(BLEND)] * len(meta)
    choices["routed"] = list(picks)
    names = list(choices)
    scores = score_rows(plex, examples, [choices[v] for v in names], start=n_layers - s.top_layers)
    records = []
    for (d, i, _), row_scores, pick in zip(meta, scores, picks):
        for v, sc in zip(names, row_scores):
            records.append({"domain": d, "row": i, "variant": v, "choice": _jsonable(choices[v][0] if v != "routed"
                                                                                   else pick), **asdict(sc),
                            "exact": sc.exact})
        own = row_scores[names.index(d)]
        records.append({"domain": d, "row": i, "variant": "oracle", "choice": d, **asdict(own), "exact": own.exact})
    routing_accuracy = sum(p == d for (d, _, _), p in zip(meta, picks)) / max(len(meta), 1)
    times["eval"] = time.perf_counter() - t

    log("[4/5] two-stage pipeline on the lang rows: code continues the snippet, then lang names the language")
    t = time.perf_counter()
    pipe = pipeline_rows(plex, tok, rows["lang"], new_tokens=s.pipeline_tokens, max_length=s.max_length)
    records += pipe
    times["pipeline"] = time.perf_counter() - t
    table = summarise(records)
    with open(out / "eval_rows.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

    served = None
    if serve:
        log("[5/5] serving: one chat completion per adapter through the openai client")
        t = time.perf_counter()
        served = serve_chats(plex, demo_questions(rows), max_tokens=s.chat_tokens, log=log)
        times["serve"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    times["total_cpu"] = time.process_time() - cpu0  # all threads: about 2x the wall time of an idle 2-core box
    summary = {"settings": asdict(s), "table": table, "routing_accuracy": routing_accuracy,
               "checks": [{"text": c, "ok": ok} for c, ok in checks(table)], "served": served,
               "trained": result.trained, "train_tokens_per_second": result.tokens_per_second,
               "seconds": times, "config": str(cfg_path)}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    text = format_table(table, routing_accuracy)
    (out / "results.md").write_text(text + "\n")
    log("")
    log(text)
    log("")
    for c in summary["checks"]:
        log(f"{'ok  ' if c['ok'] else 'MISS'} {c['text']}")
    log("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return summary


def demo_questions(rows: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """One chat question per adapter: a code request, a documentation request, a held-out ``lang`` message."""
    return {"code": "Write a Python function that returns the reverse of a string.",
            "docs": "Explain in two sentences what a software licence is.",
            "lang": rows["lang"][0]["message"]}


def pipeline_rows(plex: Any, tok: Any, rows: Sequence[dict[str, Any]], *, new_tokens: int,
                  max_length: int) -> list[dict[str, Any]]:
    """The ``pipeline`` variant on the task domain: stage 1 (``code``) continues each held-out snippet by
    ``new_tokens`` greedy tokens, stage 2 (``lang``) answers the task prompt over snippet + continuation; scored by
    exact match of the generated answer (loss is not defined for a pipeline)."""
    from loraplex.demo.llm_data import LANG_SNIPPET_CHARS, chat_prompt, lang_message
    from loraplex.train.data import encode_prompt

    pad = pad_id(tok)
    snippets = [r["message"].split("\n\n", 1)[1] for r in rows]
    ids, mask = pad_batch([encode_prompt(tok, sn, max_length) for sn in snippets], pad, left=True)
    gen = plex.generate(ids, attention_mask=mask, adapters="code", max_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=pad)
    stage1 = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    prompts = [chat_prompt(tok, lang_message((sn + c)[-LANG_SNIPPET_CHARS:])) for sn, c in zip(snippets, stage1)]
    ids2, mask2 = pad_batch([encode_prompt(tok, p, max_length + new_tokens) for p in prompts], pad, left=True)
    gen2 = plex.generate(ids2, attention_mask=mask2, adapters="lang", max_new_tokens=6, do_sample=False,
                         pad_token_id=pad)
    answers = tok.batch_decode(gen2[:, ids2.shape[1]:], skip_special_tokens=True)
    out = []
    for i, (r, a, s1) in enumerate(zip(rows, answers, stage1)):
        ok = a.strip() == r["response"]
        out.append({"domain": "lang", "row": i, "variant": "pipeline", "choice": "stack(code,lang,mode=pipeline)",
                    "loss_sum": 0.0, "n_tokens": 1, "correct": int(ok), "exact": ok, "stage1": s1, "answer": a})
    return out


def _jsonable(choice: Any) -> Any:
    return dict(choice) if isinstance(choice, dict) else choice


def _read(path: Path) -> list[dict[str, Any]]:
    from loraplex.train.data import read_rows

    return read_rows(path)
