"""A trained run's folder (loraplex.run): layout, state.json, fingerprints, opening a run for serving."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from loraplex.config import ConfigError, load_config
from loraplex.errors import UnknownAdapterError
from loraplex.run import (ADAPTERS_DIR, TrainedRun, adapter_fingerprint, merge_fingerprint, router_fingerprint,
                          serve_arguments)
from train_project import example_dict, example_project


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A folder with the example config and its two dataset files."""
    return example_project(tmp_path)


# ---------------------------------------------------------------------------------------------------- layout
def test_default_folder_and_layout(project: Path, tmp_path: Path) -> None:
    (project / "exp1.yaml").write_text((project / "train.yaml").read_text())
    assert TrainedRun.of(load_config(project / "exp1.yaml")).root == Path("runs/exp1")  # runs/<config stem>
    assert TrainedRun.of(load_config(example_dict())).root == Path("runs/train")  # a dict: runs/train
    cfg = load_config(project / "train.yaml")
    d = example_dict()
    d["output_dir"] = str(tmp_path / "elsewhere")
    assert TrainedRun.of(load_config(d)).root == tmp_path / "elsewhere"
    run = TrainedRun.of(cfg, tmp_path / "out")  # an explicit folder wins
    assert run.root == tmp_path / "out"
    assert run.adapter_dir("coding") == tmp_path / "out" / "adapters" / "coding"
    assert (run.router_dir, run.state_path) == (tmp_path / "out" / "router", tmp_path / "out" / "state.json")
    assert not run.has_adapter("coding") and not run.has_router() and run.present(["coding", "chat"]) == []
    run.adapter_dir("chat").mkdir(parents=True)
    (run.adapter_dir("chat") / "adapter_config.json").write_text("{}")
    (run.router_dir).mkdir()
    (run.router_dir / "router.json").write_text("{}")
    assert run.present(["coding", "chat"]) == ["chat"] and run.has_router()


def test_state_updates_merge_records_and_write_atomically(tmp_path: Path) -> None:
    run = TrainedRun(tmp_path / "out")
    assert run.load_state() == {"version": 1, "adapters": {}, "merges": {}}
    run.update_state(adapters={"a": {"fingerprint": "1"}}, active="a")
    run.update_state(merges={"m": {"fingerprint": "2"}})
    run.update_state(adapters={"b": {"fingerprint": "3"}}, router={"fingerprint": "4"})
    on_disk = json.loads(run.state_path.read_text())
    assert on_disk == {"version": 1, "active": "a", "adapters": {"a": {"fingerprint": "1"}, "b": {"fingerprint": "3"}},
                       "merges": {"m": {"fingerprint": "2"}}, "router": {"fingerprint": "4"}}
    assert run.recorded_fingerprint("adapters", "b") == "3" and run.recorded_fingerprint("merges", "m") == "2"
    assert run.recorded_fingerprint("router") == "4" and run.recorded_fingerprint("adapters", "x") is None
    assert [p.name for p in run.root.iterdir()] == ["state.json"]  # no temporary file left behind
    # readers never see a half-written file while another thread rewrites it
    stop = threading.Event()
    seen: list[int] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(len(json.loads(run.state_path.read_text())["adapters"]))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            run.update_state(adapters={f"x{i}": {"fingerprint": "0" * 64}})
    finally:
        stop.set()
        reader.join()
    assert seen and all(2 <= n <= 202 for n in seen)
    run.state_path.write_text("{broken")
    with pytest.raises(Exception, match="state.json: not valid JSON"):
        run.load_state()


def test_active_prefers_the_recorded_choice(project: Path, tmp_path: Path) -> None:
    cfg = load_config(project / "train.yaml")
    run = TrainedRun(tmp_path / "out")
    assert run.active(cfg) == "coding_chat"
    run.update_state(active="chat")
    assert run.active(cfg) == "chat"


def test_serve_arguments_name_what_was_trained(project: Path, tmp_path: Path) -> None:
    d = example_dict()
    d["output_dir"] = str(tmp_path / "out")
    (project / "serve.yaml").write_text(yaml.safe_dump(d))
    cfg = load_config(project / "serve.yaml")
    with pytest.raises(ConfigError, match=r"cannot serve .*serve\.yaml: no trained adapters in .*out/adapters; "
                                          r"run `loraplex train .*serve\.yaml` first"):
        serve_arguments(cfg)
    run = TrainedRun.of(cfg)
    for n in ("coding", "coding_chat"):
        run.adapter_dir(n).mkdir(parents=True)
        (run.adapter_dir(n) / "adapter_config.json").write_text("{}")
    args = serve_arguments(cfg)
    assert args == {"base": "PATH_OR_HUB_ID",
                    "adapters": {n: str(tmp_path / "out" / ADAPTERS_DIR / n) for n in ("coding", "coding_chat")},
                    "compositions": {"active": "coding_chat"}}
    run.router_dir.mkdir()
    (run.router_dir / "router.json").write_text("{}")
    run.update_state(active="router")
    args = serve_arguments(cfg)
    assert args["router_dir"] == str(run.router_dir) and args["compositions"] == {"active": "auto"}


# ---------------------------------------------------------------------------------------------------- fingerprints
def test_fingerprint_tracks_config_base_and_data(project: Path) -> None:
    cfg = load_config(project / "train.yaml")
    fp = adapter_fingerprint(cfg, "coding")
    assert len(fp) == 64 and fp == adapter_fingerprint(load_config(project / "train.yaml"), "coding")
    assert fp != adapter_fingerprint(cfg, "chat")

    # unrelated change: another adapter, the merge, checkpointing -> unchanged
    d = example_dict()
    d["adapters"]["adapters"]["chat"]["r"] = 4
    d["adapters"]["merge"]["density"] = 0.2
    d["trainer"]["checkpoint_every"] = 100
    (project / "other.yaml").write_text(yaml.safe_dump(d))
    assert adapter_fingerprint(load_config(project / "other.yaml"), "coding") == fp

    # own settings, base model, trainer -> changed
    for change in (lambda d: d["adapters"]["adapters"]["coding"].update(r=8),
                   lambda d: d.update(base_model="other"),
                   lambda d: d["trainer"].update(epochs=4)):
        d = example_dict()
        change(d)
        (project / "changed.yaml").write_text(yaml.safe_dump(d))
        assert adapter_fingerprint(load_config(project / "changed.yaml"), "coding") != fp

    # data content -> changed; same content at another path -> same
    (project / "data" / "code.jsonl").write_text('{"prompt": "x", "response": "y"}\n')
    assert adapter_fingerprint(load_config(project / "train.yaml"), "coding") != fp


def test_fingerprint_follows_stack_on(tmp_path: Path) -> None:
    for n in ("a", "b"):
        (tmp_path / f"{n}.csv").write_text("prompt,response\n1,2\n")
    data = {"base_model": "m", "adapters": {"adapters": {"a": {"dataset": "a.csv"},
                                                         "b": {"dataset": "b.csv", "stack_on": "a"}}}}
    cfg = load_config(data, base_dir=tmp_path)
    fp_b = adapter_fingerprint(cfg, "b")
    (tmp_path / "a.csv").write_text("prompt,response\n3,4\n")
    assert adapter_fingerprint(load_config(data, base_dir=tmp_path), "b") != fp_b


def test_fingerprint_missing_dataset_and_unknown_adapter(tmp_path: Path) -> None:
    cfg = load_config({"base_model": "m", "adapter": {"dataset": "gone.csv"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="adapter.dataset: cannot read"):
        adapter_fingerprint(cfg, "default")
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'x'"):
        adapter_fingerprint(cfg, "x")


def test_merge_and_router_fingerprints_follow_their_inputs(project: Path) -> None:
    cfg = load_config(project / "train.yaml")
    merge_fp, router_fp = merge_fingerprint(cfg, cfg.merges[0]), router_fingerprint(cfg)
    assert len(merge_fp) == 64 and len(router_fp) == 64 and merge_fp != router_fp
    for change, merge_same, router_same in (
            (lambda d: d["adapters"]["merge"].update(density=0.2), False, True),
            (lambda d: d["adapters"]["router"].update(type="linear"), True, False),
            (lambda d: d["adapters"]["adapters"]["chat"].update(r=4), False, False),  # a source and an expert
            (lambda d: d["trainer"].update(checkpoint_every=5), True, True)):
        d = example_dict()
        change(d)
        (project / "changed.yaml").write_text(yaml.safe_dump(d, sort_keys=False))  # keep the experts' order
        other = load_config(project / "changed.yaml")
        assert (merge_fingerprint(other, other.merges[0]) == merge_fp) is merge_same
        assert (router_fingerprint(other) == router_fp) is router_same
