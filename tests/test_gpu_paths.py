"""Larger models on GPUs: model.dtype, model.quantization (QLoRA), model.device_map and fp16 loss scaling.

On a CPU-only machine these check the config paths, the refusals (before any model loads) and bf16 base
weights on the CPU; the tests marked ``cuda`` run only where a CUDA device (and bitsandbytes) is present.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from fedpeft import config, data, models, precision, report, training
from fedpeft.config import AdapterSection, ModelSection
from fedpeft.errors import ConfigError
from fedpeft.simulation import runner
from fedpeft.sources import Examples

from conftest import QA, tiny_overrides

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_BNB = __import__("importlib.util").util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("sets, match", [
    ({"model.quantization": "4bit", "model.name": "tiny-llama"}, "built from a config"),
    ({"model.dtype": "fp16", "run.device": "cpu"}, r"model.dtype = 'fp16' needs a CUDA GPU"),
    ({"model.quantization": "8bit", "model.name": "some/model", "run.device": "cpu"}, "needs a CUDA GPU"),
    ({"model.dtype": "bf16", "split.enabled": True}, "split learning runs fp32"),
    ({"model.dtype": "bf16", "privacy.mode": "local"}, "local DP-SGD .* fp32 base weights only"),
    ({"model.dtype": "fp64"}, r"model.dtype = 'fp64' is not allowed; choose one of: 'fp32', 'bf16', 'fp16'"),
    ({"model.device_map": "everywhere"}, "model.device_map = 'everywhere' is not allowed"),
])
def test_config_refusals_name_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_hardware_refusals_on_a_cpu_only_machine(caplog):
    if torch.cuda.is_available():
        pytest.skip("checks what a machine without CUDA refuses")
    with pytest.raises(ConfigError, match="model.dtype = 'fp16' runs on a GPU only"):
        precision.check_hardware(ModelSection(dtype="fp16"), CPU)
    with pytest.raises(ConfigError, match=r"model.quantization = '4bit' .*needs .*a CUDA device") as e:
        precision.check_hardware(ModelSection(quantization="4bit"), CPU)
    assert ("bitsandbytes" in str(e.value)) is not HAS_BNB  # names each missing part
    with pytest.raises(ConfigError, match="model.device_map = 'balanced' spreads the model over CUDA GPUs"):
        precision.check_hardware(ModelSection(device_map="balanced"), CPU)
    with caplog.at_level("INFO"):
        precision.check_hardware(ModelSection(device_map="auto"), CPU)  # 'auto' without CUDA: the CPU
    assert "stays on the cpu" in caplog.text


def test_quantized_run_fails_in_one_line_before_the_model_loads_and_leaves_no_run_directory(qa_data, tmp_path):
    if torch.cuda.is_available() and HAS_BNB:
        pytest.skip("this machine can run QLoRA")
    model_dir = tmp_path / "tiny-llama"
    models.load_base_model(ModelSection(name="tiny-llama", task="causal_lm")).save_pretrained(model_dir)
    models.byte_tokenizer().save_pretrained(model_dir)
    sets = tiny_overrides(qa_data, tmp_path / "runs", **{"model.name": str(model_dir), "model.task": "causal_lm",
                                                         "model.quantization": "4bit"})
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "fedpeft.cli", "simulate", *args], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "model.quantization = '4bit'" in err[0] and "CUDA" in err[0]
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
    assert time.time() - t0 < 120  # the interpreter and imports only (a loaded CI machine), no model


def _qa_data():
    tok = models.byte_tokenizer()
    ex = Examples("causal_lm", [q for q, _ in QA], [-1] * len(QA), [], [q for q, _ in QA], [a for _, a in QA])
    return data.tokenize(ex, tok, 32, "causal_lm"), data.Collator(tok.pad_token_id, "causal_lm")


def _bf16_model(task: str, pooling: str = "mean", adapter: str = "lora"):
    cfg = ModelSection(name="tiny-llama" if task == "causal_lm" else "tiny-bert", task=task, pooling=pooling,
                       dtype="bf16")
    base = models.load_base_model(cfg, num_labels=3)
    return models.build_peft_model(base, AdapterSection(type=adapter, r=4), task)


@pytest.mark.parametrize("task, pooling, adapter", [("causal_lm", "mean", "lora"), ("causal_lm", "mean", "prompt"),
                                                    ("classification", "mean", "lora"),
                                                    ("classification", "model", "lora")])
def test_bf16_base_weights_train_fp32_adapters_on_the_cpu(task, pooling, adapter):
    model = _bf16_model(task, pooling, adapter)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    if task == "causal_lm":
        ds, collate = _qa_data()
    else:
        tok = models.byte_tokenizer()
        ex = Examples("classification", ["apple pear", "rain snow", "truck wheel"] * 4, [0, 1, 2] * 4, ["a", "b", "c"])
        ds, collate = data.tokenize(ex, tok, 32, task), data.Collator(tok.pad_token_id, task)
    before = training.evaluate(model, ds, collate, 16, CPU, task)["eval_loss"]
    start = models.adapter_state(model)
    res = training.train_local(model, ds, collate, config.TrainSection(local_steps=20, batch_size=8, lr=0.02), CPU, 0)
    after = training.evaluate(model, ds, collate, 16, CPU, task)["eval_loss"]
    state = models.adapter_state(model)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert any(not torch.equal(state[k], start[k]) for k in state)
    assert res.loss == res.loss and after < before  # finite, and it learned


def test_a_bf16_run_end_to_end(qa_data, tmp_path):
    cfg = config.load(None, tiny_overrides(qa_data, tmp_path / "runs", **{
        "model.name": "tiny-gpt2", "model.task": "causal_lm", "model.dtype": "bf16", "federation.rounds": 2}))
    rows = report.read_metrics(runner.simulate(cfg))
    assert all(r["replies"] == 3 for r in rows) and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_device_map_auto_on_a_cpu_only_machine_loads_on_the_cpu(qa_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    cfg = config.load(None, tiny_overrides(qa_data, tmp_path / "runs", **{
        "model.name": "tiny-gpt2", "model.task": "causal_lm", "model.device_map": "auto", "federation.rounds": 1}))
    assert report.read_metrics(runner.simulate(cfg))[0]["replies"] == 3


# ----------------------------------------------------------------------------- fp16 loss scaling

def test_no_loss_scaling_without_fp16_autocast():
    assert not training.loss_scaler(CPU, None).is_enabled()
    assert not training.loss_scaler(CPU, torch.bfloat16).is_enabled()


def test_fp16_autocast_scales_the_loss_and_unscales_before_clipping(monkeypatch):
    """The scaled path on the CPU's fp16 autocast (where CUDA is absent): the clipped gradients the Fisher sums
    read and the SGD steps match a run without autocast within fp16 rounding; clipping the still-scaled
    gradients (no unscale first) would shrink every step 65536x."""
    ds, collate = _qa_data()
    tcfg = config.TrainSection(local_steps=3, batch_size=6, lr=1.0, optimizer="sgd", max_grad_norm=0.05)
    ref_model, model = _tiny_causal(), _tiny_causal()
    start = models.adapter_state(model)
    ref = training.train_local(ref_model, ds, collate, tcfg, CPU, seed=0, fisher=True)
    monkeypatch.setattr(training, "autocast_dtype", lambda *args: torch.float16)
    assert training.loss_scaler(CPU, torch.float16).is_enabled()
    scaled = training.train_local(model, ds, collate, tcfg, CPU, seed=0, fisher=True)
    rel = lambda a, b: float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))  # noqa: E731
    flat = lambda d: torch.cat([v.flatten() for v in d.values()])  # noqa: E731
    assert rel(flat(scaled.fisher), flat(ref.fisher)) < 0.1
    step = flat(models.subtract(models.adapter_state(model), start))
    ref_step = flat(models.subtract(models.adapter_state(ref_model), start))
    assert float(torch.linalg.vector_norm(ref_step)) > 0.05 and rel(step, ref_step) < 0.1


def _tiny_causal():
    base = models.load_base_model(ModelSection(name="tiny-llama", task="causal_lm"), seed=0)
    return models.build_peft_model(base, AdapterSection(r=4), "causal_lm", seed=0)


# ----------------------------------------------------------------------------- on a GPU only

@cuda
def test_fp16_base_on_cuda_trains_with_a_grad_scaler():
    base = models.load_base_model(ModelSection(name="tiny-llama", task="causal_lm", dtype="fp16"))
    model = models.build_peft_model(base, AdapterSection(r=4), "causal_lm").cuda()
    ds, collate = _qa_data()
    res = training.train_local(model, ds, collate, config.TrainSection(local_steps=10, batch_size=6),
                               torch.device("cuda"), 0)
    assert res.loss == res.loss


@cuda
@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_loads_a_quantized_base_and_trains_fp32_adapters(tmp_path, bits):
    d = tmp_path / "m"
    models.load_base_model(ModelSection(name="tiny-llama", task="causal_lm")).save_pretrained(d)
    cfg = ModelSection(name=str(d), task="causal_lm", quantization=bits)
    precision.check_hardware(cfg, torch.device("cuda"))
    model = models.build_peft_model(models.load_base_model(cfg), AdapterSection(r=4), "causal_lm")
    assert getattr(model, "hf_device_map", None) and precision.place(model, torch.device("cuda")) is model
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ds, collate = _qa_data()
    res = training.train_local(model, ds, collate, config.TrainSection(local_steps=3, batch_size=6),
                               torch.device("cuda"), 0)
    assert res.loss == res.loss


@cuda
def test_device_map_auto_places_the_model_with_accelerate(tmp_path):
    d = tmp_path / "m"
    models.load_base_model(ModelSection(name="tiny-llama", task="causal_lm")).save_pretrained(d)
    base = models.load_base_model(ModelSection(name=str(d), task="causal_lm", device_map="auto", dtype="bf16"))
    assert getattr(base, "hf_device_map", None)
