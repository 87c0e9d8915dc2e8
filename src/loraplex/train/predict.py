"""``loraplex predict``: run trained adapters (or a composition of them) over a dataset; write predictions + metrics.

* causal LM rows (``prompt`` [+ ``response``] or ``text``): generation from the prompt (the config's prompt
  template applied; greedy and bounded by ``max_new_tokens`` unless the config's ``generation`` block says
  otherwise), and with a response or text, the teacher-forced loss. Metrics: ``loss``, ``perplexity`` (token
  weighted) and ``exact_match`` (generated token ids up to eos == the response's token ids).
* classification: the predicted label and its probability; metrics ``accuracy`` and ``macro_f1``.
* token classification: one BIO tag per word (from the word's first sub-token); metrics entity-level
  ``precision`` / ``recall`` / ``f1`` (exact span and type, conlleval rules) and ``token_accuracy``.

Rows run in batches through the mixed-batch runtime. The adapter choice is ``--adapter NAME``, ``--compose SPEC``
(``blend(a=0.7,b=0.3)``, ``stack(a,b)``, ... through :mod:`loraplex.compose`) or, by
default, the config's ``active``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from loraplex.adapters.io import atomic_write_text
from loraplex.api import Plex
from loraplex.compose.spec import ComposeSpecError, parse
from loraplex.config import TrainConfig, load_config
from loraplex.errors import LoraplexError
from loraplex.plan import NeedsCompositionError, RowSpec, rows_from_spec
from loraplex.run import TrainedRun, load_trained_plex
from loraplex.tokens import eos_id, first_tokens, pad_batch, pad_id
from loraplex.train.data import (IGNORE, DataError, bio_spans, encode_response, examples_for_task, read_rows,
                                 resolve_columns, row_prompt, write_rows)

__all__ = ["PredictResult", "Runner", "classification_metrics", "entity_metrics", "make_runner", "predict",
           "rows_for_choice"]


@dataclass
class PredictResult:
    """Where predictions went, and the metrics (empty when the data has no labels / responses)."""

    path: Path
    n_rows: int
    choice: str
    task: str
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_path: Path | None = None


# ------------------------------------------------------------------------------------------------ metrics
def classification_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (over the labels seen in gold or predictions)."""
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0
    f1s = []
    for lab in sorted(set(gold) | set(pred)):
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "n": n}


def entity_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 over BIO sequences, plus token accuracy."""
    tp = n_pred = n_gold = 0
    tok_ok = tok_n = 0
    for g, p in zip(gold, pred):
        gs, ps = bio_spans(g), bio_spans(p)
        tp += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
        tok_ok += sum(a == b for a, b in zip(g, p))
        tok_n += len(g)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "token_accuracy": tok_ok / tok_n if tok_n else 0.0,
            "n": len(gold)}


# ------------------------------------------------------------------------------------------------ choices
def rows_for_choice(plex: Plex, config: TrainConfig, choice: str) -> RowSpec | None:
    """The per-row adapter spec for an adapter name, ``base``, ``blend(...)`` or an additive ``stack(...)`` (stacked
    adapters bring the adapters they were trained on); None for compositions that need :mod:`loraplex.compose`."""
    try:
        return rows_from_spec(choice if choice in plex else parse(choice), plex.adapters,
                              below=lambda n: plex.get_adapter(n).meta.get("stack_on") or [])
    except ComposeSpecError as exc:
        raise LoraplexError(f"--compose / active {choice!r}: {exc}") from None
    except NeedsCompositionError:
        return None


class Runner:
    """Forward / generate for one adapter choice: a per-row spec through the mixed-batch runtime, or a composition
    built by :func:`loraplex.compose.build.build_composition` (routers, ensembles, in-layer stacks, ...)."""

    def __init__(self, plex: Plex, rowspec: RowSpec | None = None, composition: Any = None) -> None:
        self.plex = plex
        self.rowspec = rowspec
        self.composition = composition

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        if self.composition is not None:
            return self.composition(ids, mask)
        return self.plex(ids, attention_mask=mask, adapters=[self.rowspec] * ids.shape[0])

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.composition is not None:
            return self.composition.generate(ids, mask, **kw)
        return self.plex.generate(ids, attention_mask=mask, adapters=[self.rowspec] * ids.shape[0], **kw)


def make_runner(plex: Plex, config: TrainConfig, choice: str, output_dir: Path) -> tuple[Runner, list[str]]:
    """The runner for ``choice`` and the adapter names it may use."""
    router_dir = TrainedRun(output_dir).router_dir
    if choice in ("router", "auto"):
        choice = f"moe({router_dir})" if choice == "router" else "auto"
    rowspec = rows_for_choice(plex, config, choice)
    if rowspec is not None:  # encoders: the row's first adapter with a head produces its logits
        heads = [n for n, w in rowspec if w != 0 and plex.get_adapter(n).meta.get("labels")]
        return Runner(plex, rowspec), heads[:1] if heads else [n for n, _ in rowspec]
    from loraplex.compose.build import build_composition
    from loraplex.compose.spec import MoE, Auto, parse

    node = parse(choice)
    routers = {"auto": str(router_dir), "router": str(router_dir)} if router_dir.is_dir() else {}
    if isinstance(node, (MoE, Auto)) and not routers and not (isinstance(node, MoE) and Path(node.router).is_dir()):
        raise LoraplexError(f"{choice!r} needs a trained router ({router_dir} does not exist): add an adapters.router "
                            f"block to the config and train")
    comp = build_composition(plex, node, routers=routers, tokenizer=plex.tokenizer)
    router = getattr(comp, "router", None)
    names = list(getattr(router, "experts", None) or node.adapter_names())
    return Runner(plex, None, comp), names


def _task_for(plex: Plex, config: TrainConfig, names: Sequence[str]) -> tuple[str, dict[str, list[str]]]:
    """(task, {adapter: labels}) for rows that may use ``names`` (encoders: every head must do the same task)."""
    if config.model_type == "llm":
        return "causal_lm", {}
    tasks: dict[str, list[str]] = {}
    kinds = set()
    for name in names:
        meta = plex.get_adapter(name).meta
        if meta.get("task") in ("classification", "token_classification") and meta.get("labels"):
            tasks[name] = list(meta["labels"])
            kinds.add(meta["task"])
    if not kinds:
        raise LoraplexError(f"none of the chosen adapters ({', '.join(names) or 'base'}) has a task head "
                            f"(classification / token_classification)")
    if len(kinds) > 1:
        raise LoraplexError(f"the chosen adapters mix tasks ({', '.join(sorted(kinds))}); predict one task at a time")
    return kinds.pop(), tasks


# ------------------------------------------------------------------------------------------------ predict
def predict(config: TrainConfig | str | os.PathLike[str], dataset: str | os.PathLike[str], *,
            adapter: str | None = None, compose: str | None = None, out: str | os.PathLike[str] | None = None,
            output_dir: str | os.PathLike[str] | None = None, batch_size: int | None = None,
            max_new_tokens: int | None = None, device: str | torch.device | None = None,
            progress: bool | None = None, plex: Plex | None = None) -> PredictResult:
    """Predict ``dataset`` with ``adapter`` / ``compose`` / the config's ``active``; write predictions and metrics.

    ``out`` defaults to ``<output_dir>/predictions/<dataset stem>.<choice>.<csv|jsonl>`` (the dataset's format);
    metrics go to ``<out stem>.metrics.json`` when the data has labels or responses. Causal LM generation uses the
    config's ``generation`` settings; ``max_new_tokens`` here overrides the config's. ``batch_size`` defaults to
    ``trainer.eval_batch_size``.
    """
    if adapter is not None and compose is not None:
        raise LoraplexError("give --adapter or --compose, not both")
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    run = TrainedRun.of(config, output_dir)
    out_dir = run.root
    choice = adapter or compose or run.active(config)
    if plex is None:
        plex = load_trained_plex(config, out_dir, device=device)
    if adapter is not None and adapter not in plex.adapters:
        from loraplex.errors import UnknownAdapterError

        raise UnknownAdapterError(adapter, plex.adapters)
    runner, names = make_runner(plex, config, choice, out_dir)
    task, labels = _task_for(plex, config, names)
    path = str(dataset)
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no data rows")
    own = [n for n in names if n in config.adapter_configs]
    acfg = config.get_adapter(own[0] if own else config.adapter_names[0])
    columns = resolve_columns(rows, path, task, acfg, need_labels=False)
    max_len = config.trainer.max_length
    bs = batch_size or config.trainer.eval_batch_size or max(config.trainer.batch_size, 8)
    gen_kw = config.generation.generate_kwargs()
    if max_new_tokens is None:
        max_new_tokens = gen_kw.pop("max_new_tokens", None)
    gen_kw.pop("max_new_tokens", None)
    dev = next(plex.model.parameters()).device
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", choice).strip("_") or "base"
    ext = ".csv" if path.lower().endswith(".csv") else ".jsonl"
    target = Path(out) if out is not None else run.predictions_dir / f"{Path(path).stem}.{safe[:80]}{ext}"
    bar = _bar(len(rows), progress)
    from loraplex.compose.stack import Pipeline

    try:
        if isinstance(runner.composition, Pipeline):
            if task != "causal_lm" or not columns.has_prompt:
                raise LoraplexError(f"{choice!r} is a pipeline (text in, text out, one generation per stage): it needs "
                                    f"a causal LM and a dataset with a prompt column ({path} has "
                                    f"{'no prompt column' if task == 'causal_lm' else 'task ' + task})")
            records, metrics = _predict_pipeline(runner.composition, rows, path, columns, max_len, bs, max_new_tokens,
                                                 bar)
        elif task == "causal_lm":
            records, metrics = _predict_causal(runner, rows, path, columns, max_len, bs, dev, max_new_tokens, bar,
                                               gen_kw)
        else:
            records, metrics = _predict_encoder(runner, task, rows, path, columns, labels, max_len, bs, dev, bar)
    finally:
        if bar is not None:
            bar.close()
    write_rows(target, records)
    result = PredictResult(target, len(records), choice, task)
    if metrics:
        result.metrics = {"choice": choice, "task": task, "dataset": path, **metrics}
        mpath = target.with_name(target.stem + ".metrics.json")
        atomic_write_text(mpath, json.dumps(result.metrics, indent=2))
        result.metrics_path = mpath
    return result


def _bar(total: int, enabled: bool | None) -> Any:
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="predict", unit="row", disable=None if enabled is None else not enabled)


def _tick(bar: Any, n: int) -> None:
    if bar is not None:
        bar.update(n)


@torch.no_grad()
def _predict_causal(runner: Runner, rows: list[dict[str, Any]], path: str, columns: Any, max_len: int, bs: int,
                    dev: torch.device, max_new_tokens: int | None, bar: Any, gen_kw: dict[str, Any] | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Loss and generation per row; ``gen_kw`` are extra ``generate`` arguments (the config's generation block;
    greedy when it does not say ``do_sample: true``)."""
    from loraplex.train.data import encode_prompt

    tok = runner.plex.tokenizer
    pad = pad_id(tok)
    eos = eos_id(tok)
    # teacher-forced examples (loss) and prompt-only inputs (generation)
    scored, _, _ = examples_for_task(rows, path, "causal_lm", columns, tok, max_len, need_labels=False)
    by_row = {e.row: e for e in scored if isinstance(e.labels, list) and any(x != IGNORE for x in e.labels)}
    gen_inputs: list[list[int]] = []
    new, refs = _new_tokens(tok, rows, columns, max_new_tokens)
    records: list[dict[str, Any]] = [dict(r) for r in rows]
    if columns.has_prompt:
        prompts_text = [row_prompt(columns, r, path, i) for i, r in enumerate(rows)]
        gen_inputs = [encode_prompt(tok, text, max_len) for text in prompts_text]
        if columns.template is not None:  # the text the model was given
            for rec, text in zip(records, prompts_text):
                rec["prompt_text"] = text
    sampling = {"do_sample": False, **(gen_kw or {})}
    total_loss, total_tok = 0.0, 0
    exact, n_ref = 0, 0
    for s in range(0, len(rows), bs):
        idx = list(range(s, min(s + bs, len(rows))))
        exs = [by_row[i] for i in idx if i in by_row]
        if exs:  # loss on the response (or the whole text)
            ids, mask = pad_batch([e.input_ids for e in exs], pad, device=dev)
            logits = runner.forward(ids, mask).logits[:, :-1].float()
            lab = torch.full(ids.shape, IGNORE, dtype=torch.long, device=dev)
            for j, e in enumerate(exs):
                lab[j, :len(e.labels)] = torch.tensor(e.labels, device=dev)  # type: ignore[arg-type]
            lab = lab[:, 1:]
            ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                             ignore_index=IGNORE, reduction="none").view_as(lab)
            for j, e in enumerate(exs):
                k = int((lab[j] != IGNORE).sum())
                records[e.row]["loss"] = float(ce[j].sum()) / max(k, 1)
                total_loss += float(ce[j].sum())
                total_tok += k
        if gen_inputs:
            prompts = [gen_inputs[i] for i in idx]
            ids, mask = pad_batch(prompts, pad, left=True, device=dev)  # left padding for generation
            length = ids.shape[1]
            gen = runner.generate(ids, mask, max_new_tokens=new, pad_token_id=pad, eos_token_id=eos, **sampling)
            for j, i in enumerate(idx):
                out_ids = gen[j, length:].tolist()
                if eos is not None and eos in out_ids:
                    out_ids = out_ids[:out_ids.index(eos)]
                while out_ids and out_ids[-1] == pad:
                    out_ids.pop()
                records[i]["prediction"] = tok.decode(out_ids, skip_special_tokens=True).strip()
                if refs[i] is not None:
                    n_ref += 1
                    ok = out_ids == refs[i]
                    exact += int(ok)
                    records[i]["exact_match"] = ok
        _tick(bar, len(idx))
    metrics: dict[str, Any] = {}
    if total_tok:
        loss = total_loss / total_tok
        metrics.update({"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_tok})
    if n_ref:
        metrics.update({"exact_match": exact / n_ref, "max_new_tokens": new})
    if metrics:
        metrics["n"] = len(rows)
    return records, metrics


def _new_tokens(tok: Any, rows: list[dict[str, Any]], columns: Any, max_new_tokens: int | None
                ) -> tuple[int, list[list[int] | None]]:
    """(tokens to generate, reference response ids per row): enough for the longest reference, or 32."""
    refs: list[list[int] | None] = []
    for r in rows:
        resp = r.get(columns.response) if columns.response else None
        refs.append(encode_response(tok, str(resp)) if resp not in (None, "") else None)
    longest = max((len(x) for x in refs if x), default=0)
    return max_new_tokens or min(64, longest + 2 if longest else 32), refs


@torch.no_grad()
def _predict_pipeline(pipe: Any, rows: list[dict[str, Any]], path: str, columns: Any, max_len: int, bs: int,
                      max_new_tokens: int | None, bar: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row through every stage (greedy; stage prompts encoded as the training prompts were); the last stage's
    text is the prediction, earlier ones are kept as ``stage1``, ``stage2``..."""
    from loraplex.train.data import encode_prompt

    tok = pipe.tokenizer
    new, _ = _new_tokens(tok, rows, columns, max_new_tokens)
    eos = eos_id(tok)
    pipe.encode = lambda text: encode_prompt(tok, text, max_len)
    records: list[dict[str, Any]] = [dict(r) for r in rows]
    exact, n_ref = 0, 0
    for s in range(0, len(rows), bs):
        idx = list(range(s, min(s + bs, len(rows))))
        res = pipe.run([row_prompt(columns, rows[i], path, i) for i in idx], max_new_tokens=new, do_sample=False,
                       eos_token_id=eos)
        for j, i in enumerate(idx):
            for k, stage in enumerate(res.stages[:-1]):
                records[i][f"stage{k + 1}"] = stage.outputs[j]
            records[i]["prediction"] = res.outputs[j]
            resp = rows[i].get(columns.response) if columns.response else None
            if resp not in (None, ""):
                n_ref += 1
                ok = res.outputs[j] == str(resp).strip()
                exact += int(ok)
                records[i]["exact_match"] = ok
        _tick(bar, len(idx))
    metrics: dict[str, Any] = {"stages": [str(a) for a in pipe.stages]}
    if n_ref:
        metrics.update({"exact_match": exact / n_ref, "max_new_tokens": new, "n": len(rows)})
    return records, metrics if n_ref else {}


@torch.no_grad()
def _predict_encoder(runner: Runner, task: str, rows: list[dict[str, Any]], path: str, columns: Any,
                     labels: dict[str, list[str]], max_len: int, bs: int, dev: torch.device, bar: Any
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Classification or token classification; each row's labels are those of the head that produced its logits."""
    from loraplex.train.data import row_label

    tok = runner.plex.tokenizer
    first = next(iter(labels.values()))
    exs, _, extras = examples_for_task(rows, path, task, columns, tok, max_len, first, need_labels=False)
    records = [dict(r) for r in rows]
    gold_all: list[Any] = []
    pred_all: list[Any] = []
    tags_of: dict[int, list[str] | None] = {}  # token task: a row's tags, filled window by window (None: no head)
    seen = -1  # rows are encoded in order; a long token row comes as several consecutive windows
    for s in range(0, len(exs), bs):
        chunk = exs[s:s + bs]
        ids, mask = pad_batch([e.input_ids for e in chunk], pad_id(tok), device=dev)
        res = runner.forward(ids, mask)
        for j, e in enumerate(chunk):
            rec = records[e.row]
            head = res.heads[j]
            if res.logits[j] is None or head is None:
                rec["prediction"] = None
                tags_of[e.row] = None
                continue
            names = labels.get(head) or first
            if task == "classification":
                probs = torch.softmax(res.logits[j].float(), -1)
                k = int(probs.argmax())
                rec["prediction"] = names[k]
                rec["confidence"] = float(probs[k])
                g = rows[e.row].get(columns.label) if columns.label is not None else None
                if g not in (None, ""):
                    gold_all.append(row_label(g))
                    pred_all.append(names[k])
            else:  # each window sets the tags of the words it owns
                words, word_ids, _, win = extras[s + j]
                if e.row not in tags_of:
                    tags_of[e.row] = ["O"] * len(words)
                tags = tags_of[e.row]
                if tags is None:
                    continue
                best = res.logits[j].float().argmax(-1).tolist()
                for pos, w in first_tokens(word_ids, (win.own_start, win.own_end)):
                    tags[w] = names[best[pos]]
                rec["words"] = words
                rec["prediction"] = tags
            if head != next(iter(labels)) or len(labels) > 1:
                rec["adapter"] = head
        done = chunk[-1].row if s + bs >= len(exs) or exs[s + bs].row != chunk[-1].row else chunk[-1].row - 1
        _tick(bar, done - seen)
        seen = done
    if task == "classification":
        return records, classification_metrics(gold_all, pred_all) if gold_all else {}
    gold = {e.row: ex[2] for e, ex in zip(exs, extras) if ex[2] is not None and tags_of.get(e.row) is not None}
    if not gold:
        return records, {}
    return records, entity_metrics([gold[i] for i in sorted(gold)], [tags_of[i] for i in sorted(gold)])
