"""``loraplex demo`` end to end at toy sizes: real data from this machine, joint training, merge, router, serving.

The demo's reported numbers are checked against references computed another way: the data files are read back
with the csv/json modules, each own adapter's accuracy is recomputed by a plain one-row-at-a-time forward through a
Plex loaded afresh from the saved adapter folders, entity F1, macro-F1 and routing accuracy are recomputed from the
written predictions by the small functions below, and the served answers are compared with a direct forward.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from loraplex.demo.entities import ENTITY_LABELS
from loraplex.tokens import tokenize_words
from loraplex.demo.text import DatasetBuildError

PER_CLASS, TEST_PER_CLASS, MAX_LENGTH = 8, 3, 32


def _entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entities of a BIO sequence: a run of a non-``O`` tag and the ``I-`` tags of its type after it."""
    out, i = set(), 0
    while i < len(tags):
        if tags[i] == "O":
            i += 1
            continue
        typ, j = tags[i][2:], i + 1
        while j < len(tags) and tags[j] == f"I-{typ}":
            j += 1
        out.add((i, j, typ))
        i = j
    return out


def _entity_f1(rows: list[dict]) -> float:
    gold = [(k, *e) for k, r in enumerate(rows) for e in _entities(r["gold"])]
    pred = [(k, *e) for k, r in enumerate(rows) for e in _entities(r["pred"])]
    hit = len(set(gold) & set(pred))
    return 2 * hit / (len(gold) + len(pred)) if hit else 0.0


def _macro_f1(gold: list[str], pred: list[str]) -> float:
    f1 = []
    for lab in set(gold) | set(pred):
        pairs = Counter((g == lab, p == lab) for g, p in zip(gold, pred))
        tp = pairs[(True, True)]
        f1.append(2 * tp / (2 * tp + pairs[(False, True)] + pairs[(True, False)]) if tp else 0.0)
    return sum(f1) / len(f1)


def _test_rows(folder: Path, name: str) -> list[dict]:
    csv_path = folder / f"{name}.test.csv"
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    return [json.loads(line) for line in (folder / f"{name}.test.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, one_thread):
    from loraplex.demo import encoder as demo

    tmp_path = tmp_path_factory.mktemp("demo_run")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path)  # a relative output folder, as `loraplex demo` uses by default
    lines: list[str] = []
    try:
        summary = demo.run_demo("demo", per_class=PER_CLASS, test_per_class=TEST_PER_CLASS, epochs=1,
                                max_length=MAX_LENGTH, log=lines.append)
    except DatasetBuildError as exc:  # a machine without the source files the datasets are cut from
        pytest.skip(f"demo datasets cannot be built here: {exc}")
    finally:
        mp.undo()
    return demo, summary, tmp_path / "demo", lines


@pytest.fixture(scope="module")
def fresh_plex(demo_run):
    """The trained adapters loaded from their folders into a new Plex (not the demo's own objects)."""
    from loraplex.compose.features import minilm_path
    from loraplex.tasks import load_encoder_plex

    demo, _, out, _ = demo_run
    return load_encoder_plex(minilm_path(), {n: out / "adapters" / n for n in demo.TASKS})


def test_demo_runs_end_to_end_and_writes_its_table(demo_run) -> None:
    demo, summary, out, lines = demo_run
    assert set(summary["tasks"]) == set(demo.TASKS)
    for name, row in summary["tasks"].items():
        for col in ("probe", "own", "auto"):
            assert 0.0 <= row[col]["score"] <= 1.0, (name, col)
        assert 0.0 <= row["routing_accuracy"] <= 1.0
    merged = [n for n in demo.TASKS if n != "entities"]
    assert all("merged" in summary["tasks"][n] for n in merged)
    served = summary["served"]
    assert served["model"] == "auto" and len(served["data"]) == len(demo.TASKS)
    assert all(item["served_by"][0] in demo.TASKS for item in served["data"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"] == summary["tasks"] and on_disk["routing_accuracy"] == summary["routing_accuracy"]
    table = (out / "results.md").read_text()
    assert table.startswith("| task (metric) | base + head | own adapter | merged (ties) | routed (auto) |")
    assert all(f"| {n} (" in table for n in demo.TASKS)
    for n in demo.TASKS:
        assert (out / "adapters" / n / "adapter_model.safetensors").is_file()
    assert (out / "router" / "router.json").is_file()
    assert any("served by" in line for line in lines)


def test_demo_data_files_are_balanced_and_sized_as_asked(demo_run) -> None:
    demo, summary, out, _ = demo_run
    for n, (task, _) in demo.TASKS.items():
        if task == "classification":
            for split, per_class in (("train", PER_CLASS), ("test", TEST_PER_CLASS)):
                with open(out / "data" / f"{n}.{split}.csv", newline="", encoding="utf-8") as fh:
                    counts = Counter(r["label"] for r in csv.DictReader(fh))
                assert len(counts) >= 2 and set(counts.values()) == {per_class}, (n, split, counts)
        else:
            for split, total in (("train", PER_CLASS * 4), ("test", TEST_PER_CLASS * 4)):
                rows = [json.loads(x) for x in (out / "data" / f"{n}.{split}.jsonl").read_text().splitlines()]
                assert 0 < len(rows) <= total
                assert all(len(r["words"]) == len(r["tags"]) for r in rows)
        n_test = len(_test_rows(out / "data", n))
        for method, metrics in summary["tasks"][n].items():
            if method != "routing_accuracy":
                assert metrics["n"] == n_test, (n, method)


def test_reported_metrics_equal_metrics_recomputed_from_the_written_predictions(demo_run) -> None:
    demo, summary, out, _ = demo_run
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    hits = total = 0
    table = (out / "results.md").read_text()
    for n, (task, _) in demo.TASKS.items():
        gold_rows = _test_rows(out / "data", n)
        reported = summary["tasks"][n]
        by_method = {m: sorted((p for p in preds if p["task"] == n and p["method"] == m), key=lambda p: p["row"])
                     for m in ("probe", "own", "merged", "auto")}
        assert {m for m, rows in by_method.items() if rows} == set(reported) - {"routing_accuracy"}
        for method, rows in by_method.items():
            if not rows:
                continue
            assert [r["row"] for r in rows] == list(range(len(gold_rows)))
            assert [r["text"] for r in rows] == [g["text"] for g in gold_rows]
            if task == "classification":
                assert [r["gold"] for r in rows] == [g["label"] for g in gold_rows]
                gold, pred = [r["gold"] for r in rows], [r["pred"] for r in rows]
                acc = sum(g == p for g, p in zip(gold, pred)) / len(rows)
                assert reported[method]["score"] == pytest.approx(acc, abs=1e-12), (n, method)
                assert reported[method]["macro_f1"] == pytest.approx(_macro_f1(gold, pred), abs=1e-12), (n, method)
            else:
                assert [r["gold"] for r in rows] == [g["tags"] for g in gold_rows]
                assert all(len(r["pred"]) == len(r["gold"]) for r in rows)
                assert reported[method]["score"] == pytest.approx(_entity_f1(rows), abs=1e-12), (n, method)
        fixed = {"probe": f"{n}@probe", "own": n, "merged": f"{demo.MERGED}@{n}"}
        for method, adapter in fixed.items():
            assert all(set(r["adapters"]) == {adapter} for r in by_method[method]), (n, method)
        # routing: a row counts once, by the choice for its first window
        routed_ok = [r["adapters"][0] == n for r in by_method["auto"]]
        assert reported["routing_accuracy"] == pytest.approx(sum(routed_ok) / len(routed_ok), abs=1e-12)
        hits, total = hits + sum(routed_ok), total + len(routed_ok)
        # a row routed to its own adapter is answered exactly as by that adapter; one routed to another task's
        # adapter of the other kind gets no answer of this task
        for auto_row, own_row in zip(by_method["auto"], by_method["own"]):
            if set(auto_row["adapters"]) == {n}:
                assert auto_row["pred"] == own_row["pred"], auto_row
            elif all(demo.TASKS[a][0] != task for a in auto_row["adapters"]):
                no_answer = "<other-task>" if task == "classification" else ["O"] * len(auto_row["gold"])
                assert auto_row["pred"] == no_answer, auto_row
        cells = re.search(rf"^\| {n} \([^)]*\) \|(.*)\|$", table, re.M).group(1).split("|")
        assert [c.strip() for c in cells[:4]] == [
            f"{reported[m]['score']:.3f}" if m in reported else "-" for m in ("probe", "own", "merged", "auto")]
    assert summary["routing_accuracy"] == pytest.approx(hits / total, abs=1e-12)
    assert summary["routing_accuracy"] >= 0.5  # code, prose and man-page text are far apart: well above chance


def test_own_adapter_accuracy_equals_a_direct_forward_of_the_saved_adapters(demo_run, fresh_plex) -> None:
    demo, summary, out, _ = demo_run
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    tok = fresh_plex.tokenizer
    for n, (task, _) in demo.TASKS.items():
        if task != "classification":
            continue
        labels = list(fresh_plex.get_adapter(n).meta["labels"])
        written = {p["row"]: p["pred"] for p in preds if p["task"] == n and p["method"] == "own"}
        rows = _test_rows(out / "data", n)
        correct = near_ties = 0
        for k, r in enumerate(rows):
            ids = torch.tensor([tok(r["text"], truncation=True, max_length=MAX_LENGTH)["input_ids"]])
            with torch.no_grad():
                out_k = fresh_plex(ids, attention_mask=torch.ones_like(ids), adapters=[n])
            assert out_k.heads == [n]
            logits = out_k.logits[0]
            top2 = torch.topk(logits, 2).values
            near_tie = float(top2[0] - top2[1]) < 1e-4
            near_ties += near_tie
            direct = labels[int(logits.argmax())]
            assert direct == written[k] or near_tie, (n, k, direct, written[k])
            correct += direct == r["label"]
        assert abs(correct / len(rows) - summary["tasks"][n]["own"]["score"]) <= near_ties / len(rows), n


def test_served_answers_equal_a_direct_forward(demo_run, fresh_plex) -> None:
    from loraplex.compose.moe import RoutedModel
    from loraplex.compose.router import load_router

    demo, summary, out, _ = demo_run
    texts = [_test_rows(out / "data", n)[0]["text"] for n in demo.TASKS]  # the demo serves each task's first text
    router = load_router(out / "router", expected=list(demo.TASKS))
    routed = RoutedModel(fresh_plex, router).route(texts=texts).choices()
    tok = fresh_plex.tokenizer
    for text, choice, item in zip(texts, routed, summary["served"]["data"]):
        assert item["served_by"] == [choice] and item["head"] == choice, item
        if item["task"] == "classification":
            ids = torch.tensor([tok(text, truncation=True, max_length=512)["input_ids"]])
            with torch.no_grad():
                probs = torch.softmax(fresh_plex(ids, attention_mask=torch.ones_like(ids), adapters=[choice])
                                      .logits[0].float(), -1)
            labels = list(fresh_plex.get_adapter(choice).meta["labels"])
            assert item["scores"] == pytest.approx({lab: float(p) for lab, p in zip(labels, probs)}, abs=1e-4)
            assert item["score"] == pytest.approx(float(probs.max()), abs=1e-4)
            near_tie = float(torch.topk(probs, 2).values.diff().abs()) < 1e-4
            assert item["label"] == labels[int(probs.argmax())] or near_tie, item
        else:  # entities cover whole words of the training datasets' word split
            _, offsets = tokenize_words(text)
            starts, ends = {s for s, _ in offsets}, {e for _, e in offsets}
            for ent in item["entities"]:
                assert ent["start"] in starts and ent["end"] in ends and ent["label"] in ENTITY_LABELS, ent
                assert text[ent["start"]:ent["end"]] == ent["text"], ent


def test_demo_data_falls_back_to_man_sections_without_translated_pages(tmp_path, monkeypatch):
    """A machine without translated man pages: the third task is built from man-page sections instead."""
    from loraplex.demo import encoder as demo

    asked: list[str] = []

    def fake_build(name, **kw):
        asked.append(name)
        if name == "man_languages":
            raise DatasetBuildError("man_languages: no translated man pages here")
        label = {"code_language": "python", "entities": None, "man_sections": "user_commands"}[name]
        row = ({"text": "a b", "words": ["a", "b"], "tags": ["O", "O"]} if label is None
               else {"text": f"{name} text", "label": label})
        return {split: [dict(row)] for split in ("train", "validation", "test")}

    monkeypatch.setattr(demo, "build_dataset", fake_build)
    paths = demo.build_data(tmp_path, per_class=1, test_per_class=1, seed=0)
    assert asked == ["code_language", "entities", "man_languages", "man_sections"]
    assert "man_sections text" in paths["humanlang"]["train"].read_text()
