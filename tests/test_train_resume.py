"""A training run killed with SIGKILL after a checkpoint resumes with ``--resume`` to the same adapters as a run that
was never interrupted (same seed): tensors, loss history and optimizer trajectory all match exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loraplex.train import train
from loraplex.train.trainer import STEP_SLEEP_ENV
from train_project import pairs, save_tiny_llama, write_csv, write_jsonl, write_yaml

STEPS = 24  # 24 rows / batch 4 x 4 epochs, per adapter


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


def config(root: Path, **trainer: Any) -> Path:
    return write_yaml(root / "resume.yaml", {
        "base_model": "base",
        "output_dir": str(root / "killed"),
        "adapters": {"adapters": {
            # dropout > 0: the resumed run must also continue the random stream (RNG state in the checkpoint)
            "a": {"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "dataset": "a.csv"},
            "b": {"r": 2, "dropout": 0.2, "target_modules": ["q_proj", "o_proj"], "dataset": "b.jsonl"},
        }},
        "trainer": {"epochs": 4, "learning_rate": 2e-2, "batch_size": 4, "max_length": 16, "seed": 5,
                    "warmup_ratio": 0.1, "checkpoint_every": 3, **trainer},
    })


def tensors(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapters" / name / "adapter_model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 24, 0))
    write_jsonl(tmp_path / "b.jsonl", pairs("b", 24, 0))
    cfg = config(tmp_path)
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"

    # 1. a training process, slowed down a little per step so it is still running after its first checkpoint
    env = {**os.environ, STEP_SLEEP_ENV: "0.25", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.train", str(cfg), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not list(ckpts.glob("step-*.pt")):
            assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.stem.split("-")[1]) for p in ckpts.glob("step-*.pt"))
    assert steps and steps[-1] < STEPS  # killed mid-run ...
    assert not (killed / "adapters" / "a").exists()  # ... before anything was saved

    # 2. resume (the CLI's --resume is this call)
    resumed = train(cfg, resume=True, progress=False, log=lambda m: None)
    assert resumed.resumed_from is not None and Path(resumed.resumed_from).parent == ckpts
    assert resumed.trained == ["a", "b"]
    assert not ckpts.exists()  # cleaned up after the finished run

    # 3. the same config, never interrupted, into another folder
    full = train(cfg, output_dir=tmp_path / "full", progress=False, log=lambda m: None)
    assert full.resumed_from is None
    for n in ("a", "b"):
        assert len(resumed.losses[n]) == len(full.losses[n]) == STEPS
        assert resumed.losses[n] == full.losses[n]  # losses before the kill come from the checkpoint
        got, ref = tensors(killed, n), tensors(tmp_path / "full", n)
        assert got.keys() == ref.keys() and got
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)
        assert any(float(v.abs().sum()) > 0 for k, v in got.items() if "lora_B" in k)  # really trained
    state = json.loads((killed / "state.json").read_text())
    assert set(state["adapters"]) == {"a", "b"}


def test_checkpoint_of_another_config_is_not_resumed(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 8, 0))
    write_jsonl(tmp_path / "b.jsonl", pairs("b", 8, 0))
    cfg = config(tmp_path, epochs=1, checkpoint_every=1)
    from loraplex.train.checkpoint import save_checkpoint

    # a checkpoint written by a run with other settings (another key) must be ignored by --resume
    save_checkpoint(tmp_path / "killed" / "checkpoints", 1, {"version": 1, "key": {"group": ["a", "b"],
                                                                                   "fingerprints": {}}})
    res = train(cfg, resume=True, progress=False, log=lambda m: None)
    assert res.resumed_from is None and res.trained == ["a", "b"]
    assert len(res.losses["a"]) == 2
