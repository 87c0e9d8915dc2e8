"""``loraplex demo`` end to end at toy sizes: real data from this machine, joint training, merge, router, serving."""

from __future__ import annotations

import json

import pytest

from loraplex.demo.corpora import DatasetBuildError


def test_demo_runs_end_to_end_and_writes_its_table(tmp_path, monkeypatch, one_thread):
    from loraplex.demo import encoder as demo

    monkeypatch.chdir(tmp_path)  # a relative output folder, as `loraplex demo` uses by default

    lines: list[str] = []
    try:
        summary = demo.run_demo("demo", per_class=8, test_per_class=3, epochs=1, max_length=32,
                                log=lines.append)
    except DatasetBuildError as exc:  # a machine without the source files the datasets are cut from
        pytest.skip(f"demo datasets cannot be built here: {exc}")
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
    on_disk = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert on_disk["tasks"].keys() == summary["tasks"].keys()
    table = (tmp_path / "demo" / "results.md").read_text()
    assert table.startswith("| task (metric) | base + head | own adapter | merged (ties) | routed (auto) |")
    assert all(f"| {n} (" in table for n in demo.TASKS)
    for n in demo.TASKS:
        assert (tmp_path / "demo" / "adapters" / n / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "router" / "router.json").is_file()
    assert any("served by" in line for line in lines)


def test_demo_data_falls_back_to_man_sections_without_translated_pages(tmp_path, monkeypatch):
    """A machine without translated man pages: the third task is built from man-page sections instead."""
    from loraplex.demo import encoder as demo
    from loraplex.demo import corpora

    asked: list[str] = []

    def fake_build(name, **kw):
        asked.append(name)
        if name == "man_languages":
            raise corpora.DatasetBuildError("man_languages: no translated man pages here")
        label = {"code_language": "python", "entities": None, "man_sections": "user_commands"}[name]
        row = ({"text": "a b", "words": ["a", "b"], "tags": ["O", "O"]} if label is None
               else {"text": f"{name} text", "label": label})
        return {split: [dict(row)] for split in ("train", "validation", "test")}

    monkeypatch.setattr(corpora, "build_dataset", fake_build)
    paths = demo.build_data(tmp_path, per_class=1, test_per_class=1, seed=0)
    assert asked == ["code_language", "entities", "man_languages", "man_sections"]
    assert "man_sections text" in paths["humanlang"]["train"].read_text()
