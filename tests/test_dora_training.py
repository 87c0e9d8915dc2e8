"""DoRA training: loraplex's trainer makes the same steps as PEFT's DoRA (same start, data and optimizer).

The adapter starts from a PEFT DoRA folder (random A, B and magnitudes, ``pretrained_adapter_weights``) so both sides
start equal; every step uses the whole dataset (one batch, rows of one length), so the batch order cannot matter.
The reference is PEFT's own model trained with AdamW on the token-mean loss of ``response + eos``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from loraplex.adapters.io import load_adapter
from loraplex.train import train
from test_dora import make_dora_adapter
from train_project import pairs, save_tiny_llama, write_csv, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 2e-2
STEPS = 3


def _peft_steps(base_dir: Path, start: Path, rows: list[dict[str, str]]) -> tuple[list[float], dict]:
    """PEFT's DoRA: ``STEPS`` AdamW steps on all ``rows``; (loss before each step, trained parameters)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(start), is_trainable=True)
    model.train()  # lora_dropout 0: train mode changes nothing but PEFT's DoRA code path
    seqs = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        s = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(([tok.bos_token_id] + p + s, len(p)))
    assert len({len(ids) for ids, _ in seqs}) == 1  # one length: no padding on either side
    ids = torch.tensor([s for s, _ in seqs])
    labels = ids[:, 1:].clone()
    for i, (_, n_prompt) in enumerate(seqs):
        labels[i, :n_prompt] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                                 ignore_index=-100)
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    named = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, named


def test_dora_training_steps_equal_peft(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    start = make_dora_adapter(base, tmp_path / "start", seed=11, r=4, lora_alpha=8, use_dora=True,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    rows = pairs("a", 8, 0)
    write_csv(tmp_path / "a.csv", rows)
    cfg = write_yaml(tmp_path / "cfg.yaml", {
        "base_model": "base", "model_type": "llm", "output_dir": str(tmp_path / "out"),
        "adapters": {"adapters": {"d": {
            "type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True,
            "target_modules": ["q_proj", "v_proj", "down_proj"], "dataset": "a.csv",
            "pretrained_adapter_weights": str(start)}}},
        "input_features": [{"name": "prompt", "type": "text"}],
        "output_features": [{"name": "response", "type": "text"}],
        "trainer": {"epochs": STEPS, "learning_rate": LR, "batch_size": len(rows), "max_length": 16, "seed": 3,
                    "learning_rate_scheduler": {"decay": None}},
    })
    res = train(cfg, progress=False, log=lambda m: None)
    want_losses, want = _peft_steps(base_dir, start, rows)
    assert len(res.losses["d"]) == STEPS
    assert res.losses["d"] == pytest.approx(want_losses, abs=1e-5)
    assert want_losses[-1] < want_losses[0]  # it learns
    got = load_adapter(tmp_path / "out/adapters/d")
    assert got.spec.use_dora and got.is_dora
    first = load_adapter(start)
    for mod, m in got.modules.items():
        key = f"base_model.model.{mod}"
        torch.testing.assert_close(m.A, want[f"{key}.lora_A.default.weight"], atol=1e-5, rtol=0)
        torch.testing.assert_close(m.B, want[f"{key}.lora_B.default.weight"], atol=1e-5, rtol=0)
        torch.testing.assert_close(m.magnitude, want[f"{key}.lora_magnitude_vector.default.weight"], atol=1e-5, rtol=0)
        assert (m.magnitude - first.modules[mod].magnitude).abs().max() > 1e-4  # the magnitude was trained


def test_fresh_dora_adapter_starts_at_the_base_and_loads_in_peft(tmp_path: Path) -> None:
    """A DoRA adapter trained from scratch (B = 0, m = ||W||): saved with use_dora and its magnitudes, PEFT gives
    the outputs loraplex serves."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 8, 0))
    cfg = write_yaml(tmp_path / "cfg.yaml", {
        "base_model": "base", "model_type": "llm", "output_dir": str(tmp_path / "out"),
        "adapters": {"adapters": {"d": {"type": "lora", "r": 2, "alpha": 4, "dropout": 0.1, "use_dora": True,
                                        "target_modules": ["q_proj", "v_proj"], "dataset": "a.csv"}}},
        "input_features": [{"name": "prompt", "type": "text"}],
        "output_features": [{"name": "response", "type": "text"}],
        "trainer": {"epochs": 2, "learning_rate": 2e-2, "batch_size": 4, "max_length": 16, "seed": 3},
    })
    res = train(cfg, progress=False, log=lambda m: None)
    assert len(res.losses["d"]) == 4
    ad = load_adapter(tmp_path / "out/adapters/d")
    assert ad.spec.use_dora and all(m.magnitude is not None for m in ad.modules.values())
    import loraplex

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    plex = loraplex.load(copy.deepcopy(base), adapters={"d": str(tmp_path / "out/adapters/d")})
    ids = torch.randint(4, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out/adapters/d")).eval()(
            input_ids=ids).logits
        got = plex(ids, adapters=["d", "d"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
