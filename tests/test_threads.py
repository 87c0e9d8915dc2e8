"""Training in one thread while another thread serves through the SAME Plex: the served outputs never change.

The batch plan and the training overrides (differentiable stacks, LoRA dropout) are per thread, so a training
step in one thread cannot change what a serving thread computes. The reference is the frozen adapters' output,
computed before training starts; the served rows mix single adapters, a blend and the base model.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import loraplex
from conftest import make_peft_adapter
from loraplex.compose import TrainableAdapters
from loraplex.train.trainer import Trainer
from train_project import pairs, save_tiny_llama, write_csv, write_jsonl, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

SERVED = ["s1", "s2", None, {"s1": 0.5, "s2": -0.5}]  # one choice per served row
ATOL = 1e-6


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("threads")
    save_tiny_llama(root / "base")
    base = loraplex.load(root / "base").model
    served = {"s1": make_peft_adapter(base, root / "s1", seed=11, r=4, lora_alpha=8,
                                      target_modules=["q_proj", "v_proj", "up_proj"]),
              "s2": make_peft_adapter(base, root / "s2", seed=12, r=2, lora_alpha=4,
                                      target_modules=["q_proj", "o_proj"])}
    write_csv(root / "a.csv", pairs("a", 16, 0))
    write_jsonl(root / "b.jsonl", pairs("b", 16, 0))
    return {"root": root, "served": served}


def new_plex(project: dict[str, Any]) -> Any:
    plex = loraplex.load(project["root"] / "base", max_slots=8)
    for name, path in project["served"].items():
        plex.add_adapter(name, path)
    return plex


def serve_ids(plex: Any) -> torch.Tensor:
    rows = ["one two three", "red green blue", "up down left", "north south east"]
    return torch.tensor([plex.tokenizer(t)["input_ids"][:3] for t in rows])


def served_logits(plex: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return plex(ids, attention_mask=torch.ones_like(ids), adapters=SERVED).logits


def test_trainer_in_one_thread_does_not_change_what_another_thread_serves(project: dict[str, Any]) -> None:
    """The real Trainer (joint, two new adapters, LoRA dropout 0.1) trains while this thread serves."""
    root = project["root"]
    plex = new_plex(project)
    ids = serve_ids(plex)
    want = served_logits(plex, ids)  # the frozen adapters, before training
    cfg = write_yaml(root / "train.yaml", {
        "base_model": "base", "model_type": "llm", "output_dir": str(root / "out"),
        "adapters": {"adapters": {
            "a": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                  "dataset": "a.csv"},
            "b": {"type": "lora", "r": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj", "o_proj"],
                  "dataset": "b.jsonl"}}},
        "input_features": [{"name": "prompt", "type": "text"}],
        "output_features": [{"name": "response", "type": "text"}],
        "trainer": {"epochs": 4, "learning_rate": 5e-2, "batch_size": 4, "max_length": 16, "seed": 7},
    })
    trainer = Trainer(cfg, progress=False, log=lambda msg: None, device="cpu")
    trainer.plex = plex  # train into the Plex this thread serves from
    errors: list[BaseException] = []
    result: dict[str, Any] = {}

    def train() -> None:
        try:
            result["r"] = trainer.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=train, name="trainer")
    thread.start()
    served = 0
    while thread.is_alive():
        got = served_logits(plex, ids)
        assert torch.allclose(got, want, atol=ATOL, rtol=0), (served, (got - want).abs().max())
        served += 1
    thread.join()
    assert not errors, errors
    res = result["r"]
    assert sorted(res.trained) == ["a", "b"] and all(len(res.losses[n]) >= 8 for n in ("a", "b"))
    assert served >= 5  # the serving thread ran all along the training steps
    assert torch.allclose(served_logits(plex, ids), want, atol=ATOL, rtol=0)
    with torch.no_grad():  # the trained adapters are in the same Plex and change their own rows
        base = plex(ids, adapters=None).logits
        trained = plex(ids, adapters="a").logits
    assert not torch.allclose(trained, base, atol=1e-3)


def test_trainable_adapters_of_a_served_adapter_stay_in_their_thread(project: dict[str, Any]) -> None:
    """Joint-training copies of ``s1`` change s1 for the training thread only; the serving thread keeps the frozen
    s1 (every served forward runs while the training thread is inside ``active()``, after an optimizer step)."""
    plex = new_plex(project)
    ids = serve_ids(plex)
    want = served_logits(plex, ids)
    train_ids = ids[:2]
    with torch.no_grad():
        want_s1 = plex(train_ids, adapters="s1").logits
    trainable = TrainableAdapters(plex, ["s1"])
    opt = torch.optim.Adam(trainable.parameters(), lr=5e-2)
    inside, served = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    seen: list[torch.Tensor] = []
    steps = 6

    def train() -> None:
        try:
            for _ in range(steps):
                with trainable.active():
                    out = plex(train_ids, adapters="s1").logits  # [2, L, V], differentiable in the copies
                    seen.append(out.detach())
                    inside.set()  # let the serving thread run a forward now, inside the training block
                    if not served.wait(30):
                        raise TimeoutError("the serving thread did not serve")
                    served.clear()
                loss = out.float().logsumexp(-1).mean() - out.float()[..., 5].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            inside.set()

    thread = threading.Thread(target=train, name="trainable")
    thread.start()
    for step in range(steps):
        assert inside.wait(30), "the training thread did not reach its forward"
        inside.clear()
        if errors:
            break
        got = served_logits(plex, ids)
        served.set()
        assert torch.allclose(got, want, atol=ATOL, rtol=0), (step, (got - want).abs().max())
    thread.join(60)
    assert not errors, errors
    assert not torch.allclose(seen[-1], seen[0], atol=1e-3)  # training did change s1 in its own thread
    assert torch.allclose(seen[0], want_s1, atol=1e-5, rtol=0)  # before the first step the copies are s1
    trainable.close()  # not committed: the Plex still serves the frozen s1
    assert torch.allclose(served_logits(plex, ids), want, atol=ATOL, rtol=0)
