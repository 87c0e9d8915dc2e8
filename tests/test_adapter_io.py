"""PEFT <-> loraplex file round trips, modules_to_save heads, multi-adapter folders, atomic writes, the bank."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraplex
from loraplex.adapters.io import (CONFIG_NAME, WEIGHTS_NAME, load_adapter, load_adapter_dir, save_adapter,
                                  save_adapters)
from loraplex.errors import AdapterError, LoraplexError, UnknownAdapterError
from loraplex.plan import BatchPlan
from conftest import make_peft_adapter, peft_model, tiny_bert, tiny_bert_cls, tiny_gpt2, tiny_llama

ATOL = 1e-5


def _ids(n: int, length: int, seed: int = 0, lo: int = 3, hi: int = 128) -> torch.Tensor:
    return torch.randint(lo, hi, (n, length), generator=torch.Generator().manual_seed(seed))


def _read_cfg(folder: Path) -> dict:
    return json.loads((Path(folder) / CONFIG_NAME).read_text())


def _assert_same_files(src: Path, dst: Path) -> None:
    a, b = load_file(str(src / WEIGHTS_NAME)), load_file(str(dst / WEIGHTS_NAME))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert _read_cfg(src) == _read_cfg(dst)


def _randomize_saved_heads(folder: Path, needle: str = "classifier", seed: int = 0) -> None:
    """PEFT copies the base head into modules_to_save; make the adapter's head differ from the base's."""
    g = torch.Generator().manual_seed(seed)
    path = folder / WEIGHTS_NAME
    sd = load_file(str(path))
    for k in sd:
        if needle in k and "lora_" not in k:
            sd[k] = torch.randn(sd[k].shape, generator=g) * 0.5
    save_file(sd, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- round trips
ROUND_TRIP = {
    "llama_patterns_all_linear": (tiny_llama, dict(r=8, lora_alpha=16, target_modules="all-linear",
                                                    rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 5},
                                                    task_type="CAUSAL_LM"), {"target_modules": "all-linear"}),
    "llama_rslora_layers": (tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                             layers_to_transform=[0], task_type="CAUSAL_LM"), None),
    "llama_regex": (tiny_llama, dict(r=3, lora_alpha=6, target_modules=r".*\.mlp\.(up|down)_proj"), None),
    "gpt2_conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                    fan_in_fan_out=True, task_type="CAUSAL_LM"), None),
    "bert_cls_head": (tiny_bert_cls, dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
                      None),
}


def _peft_out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(ROUND_TRIP))
def test_peft_loraplex_peft_round_trip(kind: str, tmp_path: Path) -> None:
    factory, kw, over = ROUND_TRIP[kind]
    base = factory()
    src = make_peft_adapter(base, tmp_path / "peft", config_overrides=over, **kw)
    if kind == "bert_cls_head":
        _randomize_saved_heads(src)
    ad = load_adapter(src)
    dst = save_adapter(ad, tmp_path / "ours")
    _assert_same_files(src, dst)
    # ... and what we wrote loads in PEFT with identical outputs
    ids = _ids(3, 6)
    want = _peft_out(peft_model(base, src), ids)
    assert torch.equal(_peft_out(peft_model(base, dst), ids), want)
    # a registered adapter (validated, prefix-aligned, all-linear resolved by the bank) saves the same files
    plex = loraplex.load(copy.deepcopy(base), adapters={"x": src})
    with torch.no_grad():
        assert torch.allclose(plex(ids, adapters="x").logits, want, atol=ATOL, rtol=0)
    dst2 = plex.save_adapter("x", tmp_path / "from_plex")
    _assert_same_files(src, dst2)
    assert torch.equal(_peft_out(peft_model(base, dst2), ids), want)


def test_save_then_reload_in_loraplex(tmp_path: Path) -> None:
    base = tiny_llama()
    src = make_peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    ad = load_adapter(src, "renamed")
    assert ad.name == "renamed" and ad.path == str(src)
    again = load_adapter(save_adapter(ad, tmp_path / "b"))
    assert sorted(again.modules) == sorted(ad.modules)
    for k, m in ad.modules.items():
        assert torch.equal(again.modules[k].A, m.A) and torch.equal(again.modules[k].B, m.B)
        assert again.modules[k].scaling == m.scaling == 2.0
    assert ad.num_parameters == sum(m.A.numel() + m.B.numel() for m in ad.modules.values())


# --------------------------------------------------------------------------- modules_to_save heads
@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("heads")
    base2 = tiny_bert_cls(num_labels=2)
    base5 = tiny_bert_cls(num_labels=5)
    base5.bert.load_state_dict(base2.bert.state_dict())  # same encoder, different head
    two = make_peft_adapter(base2, root / "two", seed=3, r=4, lora_alpha=8, target_modules=["query", "value"],
                            task_type="SEQ_CLS")
    five = make_peft_adapter(base5, root / "five", seed=4, r=2, lora_alpha=4, use_rslora=True,
                             target_modules=["key", "dense"], task_type="SEQ_CLS")
    _randomize_saved_heads(two, seed=1)
    _randomize_saved_heads(five, seed=2)
    return {"base2": base2, "base5": base5, "two": two, "five": five}


def test_modules_to_save_round_trip(heads: dict, tmp_path: Path) -> None:
    ad = load_adapter(heads["five"])
    assert ad.spec.modules_to_save and "classifier" in ad.spec.modules_to_save
    assert set(ad.saved_modules) == {"classifier"}
    assert tuple(ad.saved_modules["classifier"]["weight"].shape) == (5, 32)
    dst = save_adapter(ad, tmp_path / "five")
    _assert_same_files(heads["five"], dst)


def test_mixed_batch_heads_with_different_label_counts(heads: dict) -> None:
    base2 = heads["base2"]
    plex = loraplex.load(copy.deepcopy(base2), adapters={"two": heads["two"], "five": heads["five"]})
    rows = ["five", "two", None, "five", "two"]
    ids = _ids(len(rows), 7, seed=4)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    mask[3, -3:] = 0
    with torch.no_grad():
        got = plex(ids, adapters=rows, attention_mask=mask).logits
        want = {
            "two": peft_model(base2, heads["two"])(input_ids=ids, attention_mask=mask).logits,
            "five": peft_model(heads["base5"], heads["five"])(input_ids=ids, attention_mask=mask).logits,
            None: base2(input_ids=ids, attention_mask=mask).logits,
        }
    assert got.shape == (len(rows), 5)
    for i, name in enumerate(rows):
        k = want[name].shape[-1]
        assert torch.allclose(got[i, :k], want[name][i], atol=ATOL, rtol=0), (i, name)
        assert torch.isneginf(got[i, k:]).all()
    assert not torch.allclose(want["two"], want[None][:, :2], atol=1e-3)  # the heads really differ
    # one adapter for every row: its own head, unpadded
    with torch.no_grad():
        only = plex(ids, adapters="two", attention_mask=mask).logits
    assert only.shape == (len(rows), 2)
    assert torch.allclose(only, want["two"], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- multi-adapter folders
def test_save_adapters_and_load_adapter_dir(tmp_path: Path) -> None:
    base = tiny_llama()
    srcs = {n: make_peft_adapter(base, tmp_path / "src" / n, seed=i, r=r, lora_alpha=2 * r,
                                 target_modules=["q_proj", "v_proj"])
            for i, (n, r) in enumerate([("code", 2), ("chat", 4), ("math", 3)])}
    ads = {n: load_adapter(p) for n, p in srcs.items()}
    root = save_adapters(ads, tmp_path / "bundle")
    assert sorted(p.name for p in root.iterdir()) == ["chat", "code", "math"]
    for n in srcs:
        _assert_same_files(srcs[n], root / n)
    loaded = load_adapter_dir(root)
    assert sorted(loaded) == ["chat", "code", "math"]
    assert {n: next(iter(a.modules.values())).rank for n, a in loaded.items()} == {"code": 2, "chat": 4, "math": 3}
    single = load_adapter_dir(root / "chat")
    assert list(single) == ["chat"]
    # a Plex over the bundle serves each like PEFT does
    plex = loraplex.load(copy.deepcopy(base), adapters={n: root / n for n in loaded})
    ids = _ids(3, 5, seed=2)
    with torch.no_grad():
        got = plex(ids, adapters=["math", "code", "chat"]).logits
        for i, n in enumerate(["math", "code", "chat"]):
            assert torch.allclose(got[i], peft_model(base, srcs[n])(input_ids=ids).logits[i], atol=ATOL, rtol=0)


def test_load_adapter_dir_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter here"):
        load_adapter_dir(tmp_path / "empty")
    with pytest.raises(AdapterError, match="not found"):
        load_adapter_dir(tmp_path / "missing")


# --------------------------------------------------------------------------- atomic writes
def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_llama()
    old = load_adapter(make_peft_adapter(base, tmp_path / "src_old", seed=1, r=2, target_modules=["q_proj"]))
    new = load_adapter(make_peft_adapter(base, tmp_path / "src_new", seed=2, r=4, target_modules=["v_proj"]))
    out_root = tmp_path / "out"
    target = save_adapter(old, out_root / "adapter")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import safetensors.torch as st

    real = st.save_file

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 13)  # half-written file ...
        raise OSError("disk full (simulated)")  # ... then the write dies

    monkeypatch.setattr(st, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(new, target)
    monkeypatch.setattr(st, "save_file", real)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old folder intact
    assert sorted(p.name for p in out_root.iterdir()) == ["adapter"]  # no temp / backup folder left behind
    again = load_adapter(target)
    assert torch.equal(next(iter(again.modules.values())).A, next(iter(old.modules.values())).A)
    # a successful overwrite replaces it and also leaves nothing behind
    save_adapter(new, target)
    assert sorted(p.name for p in out_root.iterdir()) == ["adapter"]
    assert set(load_adapter(target).modules) == set(new.modules)


# --------------------------------------------------------------------------- the bank
@pytest.fixture(scope="module")
def five(tmp_path_factory) -> dict:
    """A tiny Llama and five adapters of ranks 1..5 (different targets)."""
    root = tmp_path_factory.mktemp("five")
    base = tiny_llama()
    targets = [["q_proj"], ["v_proj", "o_proj"], ["up_proj"], ["q_proj", "down_proj"], ["k_proj", "gate_proj"]]
    paths = {f"ad{i}": make_peft_adapter(base, root / f"ad{i}", seed=20 + i, r=i + 1, lora_alpha=2 * (i + 1),
                                         target_modules=targets[i]) for i in range(5)}
    ids = _ids(2, 6, seed=11)
    with torch.no_grad():
        want = {n: peft_model(base, p)(input_ids=ids).logits for n, p in paths.items()}
        want[None] = base(input_ids=ids).logits
    return {"base": base, "paths": paths, "ids": ids, "want": want}


def _check(plex: loraplex.Plex, five: dict, rows: list) -> None:
    with torch.no_grad():
        got = plex(five["ids"], adapters=rows).logits
    for i, n in enumerate(rows):
        assert torch.allclose(got[i], five["want"][n][i], atol=ATOL, rtol=0), (i, n)


def test_register_unregister_replace(five: dict) -> None:
    p = five["paths"]
    plex = loraplex.load(copy.deepcopy(five["base"]), adapters={"x": p["ad0"]})
    assert plex.adapters == ["x"]
    plex.add_adapter("y", p["ad1"])
    assert plex.adapters == ["x", "y"]
    with torch.no_grad():
        got = plex(five["ids"], adapters=["x", "y"]).logits
    assert torch.allclose(got[0], five["want"]["ad0"][0], atol=ATOL, rtol=0)
    assert torch.allclose(got[1], five["want"]["ad1"][1], atol=ATOL, rtol=0)
    with pytest.raises(AdapterError, match="'x' is already registered"):
        plex.add_adapter("x", p["ad2"])
    plex.add_adapter("x", p["ad2"], replace=True)
    with torch.no_grad():
        got = plex(five["ids"], adapters=["x", "y"]).logits
    assert torch.allclose(got[0], five["want"]["ad2"][0], atol=ATOL, rtol=0)
    assert torch.allclose(got[1], five["want"]["ad1"][1], atol=ATOL, rtol=0)
    plex.active = "x"
    plex.remove_adapter("x")
    assert plex.adapters == ["y"] and plex.active is None
    with pytest.raises(UnknownAdapterError, match="known adapters: y"):
        plex(five["ids"], adapters=["x", None])
    assert "x" not in plex.resident()
    with pytest.raises(UnknownAdapterError):
        plex.remove_adapter("x")
    # a LoraAdapter object registers too
    plex.add_adapter("z", load_adapter(p["ad3"]))
    with torch.no_grad():
        got = plex(five["ids"], adapters=["z", "y"]).logits
    assert torch.allclose(got[0], five["want"]["ad3"][0], atol=ATOL, rtol=0)


def test_registering_walks_the_model_only_when_it_wraps_new_modules(five: dict, monkeypatch) -> None:
    """Validation reads a cached table of base modules: registering an adapter whose modules are already wrapped
    does not walk the model (it runs on the serving worker); one that wraps new modules refreshes the table."""
    p = five["paths"]
    plex = loraplex.load(copy.deepcopy(five["base"]), adapters={"x": p["ad0"]})
    calls = []
    real = type(plex.model).named_modules
    monkeypatch.setattr(type(plex.model), "named_modules", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    plex.add_adapter("again0", p["ad0"])  # loading "x" wrapped q_proj: the table is rebuilt once
    assert len(calls) == 1
    for i in (1, 2, 3):
        plex.add_adapter(f"again{i}", p["ad0"])  # the same targets: the table is reused
    assert len(calls) == 1
    new = set(load_adapter(p["ad3"]).modules) - set(plex.layers)
    plex.add_adapter("more", p["ad3"])  # wraps modules ad0 did not target ...
    plex.add_adapter("again4", p["ad0"])  # ... so the next registration rebuilds the table
    assert new and len(calls) == 2
    with torch.no_grad():  # and the adapters still serve their own outputs
        got = plex(five["ids"], adapters=["more", "again1"]).logits
    assert torch.allclose(got[0], five["want"]["ad3"][0], atol=ATOL, rtol=0)
    assert torch.allclose(got[1], five["want"]["ad0"][1], atol=ATOL, rtol=0)


def test_replace_while_held_serves_old_weights_to_holder(five: dict) -> None:
    p, ids = five["paths"], five["ids"]
    plex = loraplex.load(copy.deepcopy(five["base"]), adapters={"m": p["ad1"]})
    slots = plex.acquire(["m"])  # a running request holds the old "m"
    held = BatchPlan.build([[("m", 1.0)]] * 2, slots, plex.device)
    # replacement has another rank (the stacks grow) and the same targets as ad1 plus others
    plex.add_adapter("m", p["ad3"], replace=True)
    with torch.no_grad():
        new = plex(ids, adapters="m").logits
        with plex.using_plan(held):
            old = plex.model(input_ids=ids).logits
    assert plex.plan_state.plan is None
    assert torch.allclose(new, five["want"]["ad3"], atol=ATOL, rtol=0)
    assert torch.allclose(old, five["want"]["ad1"], atol=ATOL, rtol=0)
    assert plex.resident()["m"] != slots["m"]
    plex.release(slots)
    # the stale slot is cleared once released; new plans keep the new weights
    layer = plex.layers["model.layers.0.self_attn.v_proj"]
    assert layer.slot_rank[slots["m"]] == 0 and layer.lora_A[slots["m"]].abs().sum() == 0
    with torch.no_grad():
        assert torch.allclose(plex(ids, adapters="m").logits, five["want"]["ad3"], atol=ATOL, rtol=0)


def test_unregister_waits_for_holders(five: dict) -> None:
    plex = loraplex.load(copy.deepcopy(five["base"]), adapters={"m": five["paths"]["ad0"]})
    slots = plex.acquire(["m"])
    with pytest.raises(LoraplexError, match="still in use"):
        plex.remove_adapter("m", timeout=0.01)
    plex.release(slots)
    plex.remove_adapter("m", timeout=0.01)
    assert plex.adapters == []


def test_lru_eviction_with_few_slots(five: dict) -> None:
    names = list(five["paths"])
    plex = loraplex.load(copy.deepcopy(five["base"]), adapters=five["paths"], max_slots=2)
    for n in names + names[::-1]:
        _check(plex, five, [n, None])
        assert len(plex.resident()) <= 2
    for a, b in [("ad0", "ad4"), ("ad2", "ad1"), ("ad3", "ad0")]:
        _check(plex, five, [a, b])
    st = plex.stats
    assert st.evictions > 0 and st.misses > 2 and st.hits >= 1


def test_batch_needs_more_slots_than_the_bank_has(five: dict) -> None:
    plex = loraplex.load(copy.deepcopy(five["base"]), adapters=five["paths"], max_slots=2)
    ids = _ids(3, 4)
    with pytest.raises(LoraplexError, match="a batch uses 3 distinct adapters but the bank has only 2 device slots"):
        plex(ids, adapters=["ad0", "ad1", "ad2"])
    with pytest.raises(LoraplexError, match="a batch uses 3 distinct adapters"):
        plex(ids[:1], adapters=[{"ad0": 0.5, "ad1": 0.25, "ad2": 0.25}])
    # nothing is left held after the refusal
    assert all(c == 0 for c in plex.bank._refcount)
    _check(plex, five, ["ad0", "ad1"])


def test_cpu_budget_drops_and_reloads_from_disk(five: dict) -> None:
    plex = loraplex.load(copy.deepcopy(five["base"]), adapters=five["paths"], max_slots=2, cpu_budget_bytes=1)
    st = plex.stats
    assert st.cpu_evictions >= 4
    assert plex.nbytes()["cpu"] < sum(load_adapter(p).nbytes for p in five["paths"].values())
    for n in list(five["paths"]) * 2:
        _check(plex, five, [None, n])
    assert st.disk_reloads > 0


def test_cpu_budget_reload_keeps_prefix_alignment(tmp_path: Path) -> None:
    """An adapter trained on BertForSequenceClassification (``bert.`` paths) served on a bare BertModel,
    dropped from RAM by the byte budget and re-read from disk, still hits the right modules."""
    cls_model = tiny_bert_cls()
    paths = {n: make_peft_adapter(cls_model, tmp_path / n, seed=s, r=r, lora_alpha=8, target_modules=["query", "value"])
             for n, s, r in [("p", 1, 2), ("q", 2, 4), ("s", 3, 3)]}
    bare = tiny_bert()
    bare.load_state_dict(cls_model.bert.state_dict())
    plex = loraplex.load(bare, adapters=paths, max_slots=1, cpu_budget_bytes=1)
    assert "encoder.layer.0.attention.self.query" in plex.layers
    ids = _ids(2, 5, seed=3)
    with torch.no_grad():
        for n in ["p", "q", "s", "p"]:
            got = plex(ids, adapters=n).last_hidden_state
            want = peft_model(cls_model, paths[n])(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            assert torch.allclose(got, want, atol=ATOL, rtol=0), n
    assert plex.stats.disk_reloads > 0


# --------------------------------------------------------------------------- safetensors reads into page buffers
def test_read_safetensors_equals_the_safetensors_library(tmp_path):
    from loraplex.adapters.io import read_safetensors

    g = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(4, 7, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.randn(3, 2, generator=g).half(),
               "e": torch.zeros(0, 4), "f": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    want = load_file(str(tmp_path / "w.safetensors"))
    got = read_safetensors(tmp_path / "w.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k


def test_read_safetensors_unaligned_offsets_and_malformed_files(tmp_path):
    """A writer that packs an F32 tensor at an odd offset (legal in the format) reads right; malformed files are
    an AdapterError naming the file and what is wrong."""
    import struct

    from loraplex.adapters.io import read_weights

    header = json.dumps({"x": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "y": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}).encode()
    data = bytes([1, 2, 3]) + struct.pack("<2f", 1.5, -2.25)
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(header)) + header + data)
    got = read_weights(folder)
    assert got["x"].tolist() == [1, 2, 3] and got["y"].tolist() == [1.5, -2.25]

    whole = (folder / WEIGHTS_NAME).read_bytes()
    for bad, says in ((whole[:-4], "do not hold F32 [2]"), (whole[:6], "too short"),
                      (struct.pack("<Q", 10**6) + header, "does not fit the file"),
                      (struct.pack("<Q", 5) + b"{nope" + data, "not JSON")):
        (folder / WEIGHTS_NAME).write_bytes(bad)
        with pytest.raises(AdapterError, match="corrupt or unreadable safetensors") as err:
            read_weights(folder)
        assert str(folder / WEIGHTS_NAME) in str(err.value) and says in str(err.value)


def test_adapter_memory_leaves_the_process_when_dropped(tmp_path):
    """Under the serving process's malloc tuning (freed heap kept), 96 MB of adapter weights read and dropped
    leave resident memory where it was: the tensors live in page-backed buffers, not the heap. (The same reads
    through ``safetensors.torch.load(bytes)`` keep ~96 MB: checked as the control.)"""
    import subprocess
    import sys

    save_file({f"t{i}": torch.randn(512, 1024) for i in range(8)}, str(tmp_path / "w.safetensors"))  # 16 MB
    script = f"""
import gc, sys
from pathlib import Path
from loraplex.hostmem import tune_cpu_allocator
from loraplex.adapters.io import read_safetensors
from safetensors.torch import load
tune_cpu_allocator()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
path = Path({str(tmp_path / "w.safetensors")!r})
read = read_safetensors if sys.argv[1] == "pages" else (lambda p: load(p.read_bytes()))
read(path); gc.collect()
before = rss()
held = [read(path) for _ in range(6)]
peak = rss()
del held; gc.collect()
print(peak - before, rss() - before)
"""
    out = {}
    for how in ("pages", "heap"):
        res = subprocess.run([sys.executable, "-c", script, how], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        out[how] = [float(x) for x in res.stdout.split()]
    assert out["pages"][0] > 90 and out["pages"][1] < 4, out  # 96 MB held, then all of it returned
    assert out["heap"][1] > 60, out  # the control: the heap keeps what was freed
