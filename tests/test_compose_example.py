"""The real-data routing example (examples/domain_routing.py) at tiny sizes: it runs end to end, the router routes
held-out files well, routed top-1 is close to the oracle, and the router is saved next to the adapters."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "domain_routing.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("domain_routing_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_domain_routing_example_quick(tmp_path):
    ex = _load_example()
    threads = torch.get_num_threads()
    try:
        summary = ex.run_example(ex.QUICK, tmp_path, log=lambda *a: None, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert summary["routing_accuracy"] >= 0.8, summary["table"]
    assert summary["routed_vs_oracle_loss"] <= 0.02, summary["table"]
    names = list(summary["results"])
    assert names[0] == "base model" and "routed top-1" in names and "routed top-2 (renormalised)" in names
    assert any(n.startswith("linear merge") for n in names) and any(n.startswith("blend") for n in names)
    table = summary["table"]
    assert table.count("\n| ") == len(names) + 2  # header, separator, one row per method
    oracle = summary["results"]["oracle (own domain's adapter)"]["all"]["loss"]
    base = summary["results"]["base model"]["all"]["loss"]
    assert oracle < base + 0.05  # adapters trained on their domains do not hurt
    adapters = tmp_path / "adapters"
    for d in ("code", "prose", "shell"):
        assert (adapters / d / "adapter_config.json").is_file()
    cfg = json.loads((adapters / "router" / "router.json").read_text())
    assert cfg["experts"] == ["code", "prose", "shell"] and cfg["adapters"]["code"] == "../code"
