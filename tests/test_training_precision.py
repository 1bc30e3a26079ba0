"""train.precision: CPU bf16 autocast in training and evaluation, fp32 weights and optimizer state; ``gpu`` leaves
the CPU path exactly fp32; the default ``auto`` is bf16 on a CPU with native bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft import config, models
from fedpeft.errors import ConfigError
from fedpeft.runtime import get_runtime
from fedpeft.training import autocast_dtype, cpu_has_native_bf16, evaluate, train_local

CPU = torch.device("cpu")


def test_precision_resolves_per_device() -> None:
    assert autocast_dtype(CPU, "gpu") is None and autocast_dtype(CPU, "fp32") is None
    assert autocast_dtype(CPU, "bf16") == torch.bfloat16
    assert autocast_dtype(CPU, "auto") == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype(CPU, "auto", dp=True) is None  # DP-SGD stays fp32 on the CPU under auto
    assert autocast_dtype(torch.device("meta"), "bf16") is None


def test_an_unknown_precision_is_refused_with_the_choices(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="train.precision = 'fp8' is not allowed.*'bf16'"):
        tiny_cfg(**{"train.precision": "fp8"})


def _round(cfg, precision: str) -> tuple[dict[str, torch.Tensor], float, list[torch.dtype], object]:
    """One client's round under ``precision``: its adapter afterwards, its loss, the dtype of the first linear
    layer's output in each forward pass, and its optimizer-state dtypes."""
    rt = get_runtime(cfg)
    models.set_adapter_state(rt.model, rt.initial_adapter())
    seen: list[torch.dtype] = []
    first = next(m for m in rt.model.modules() if isinstance(m, torch.nn.Linear))
    hook = first.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        train = dataclasses.replace(cfg.train, precision=precision, local_steps=4)
        res = train_local(rt.model, rt.client_dataset(0), rt.collate, train, CPU, seed=5)
    finally:
        hook.remove()
    return models.adapter_state(rt.model), res.loss, seen, rt


def test_bf16_trains_in_bf16_and_keeps_fp32_weights(tiny_cfg, one_thread) -> None:
    cfg = tiny_cfg()
    state32, loss32, seen32, _ = _round(cfg, "fp32")
    state16, loss16, seen16, rt = _round(cfg, "bf16")
    assert set(seen32) == {torch.float32} and set(seen16) == {torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in state16.values())  # the adapter (and so the update) stays fp32
    assert all(p.dtype == torch.float32 for p in rt.model.parameters() if p.requires_grad)
    assert abs(loss16 - loss32) < 0.05 * abs(loss32)
    rel = max(float((state16[k] - state32[k]).norm() / (state32[k].norm() + 1e-12)) for k in state32)
    assert 0 < rel < 0.1  # different arithmetic, the same training


def test_gpu_precision_leaves_cpu_training_in_fp32_exactly(tiny_cfg, one_thread) -> None:
    cfg = tiny_cfg()
    state_gpu, loss_gpu, seen, _ = _round(cfg, "gpu")
    state32, loss32, _, _ = _round(cfg, "fp32")
    assert set(seen) == {torch.float32} and loss_gpu == loss32
    assert all(torch.equal(state_gpu[k], state32[k]) for k in state32)


def test_the_default_is_auto_bf16_where_the_cpu_has_it(tiny_cfg, one_thread) -> None:
    assert config.load(None, []).train.precision == "auto"  # measured: final accuracy within 0.5 point of fp32
    _, _, seen, _ = _round(tiny_cfg(), "auto")
    assert set(seen) == {torch.bfloat16 if cpu_has_native_bf16() else torch.float32}


def test_bf16_evaluation_stays_close_to_fp32(tiny_cfg, one_thread) -> None:
    cfg = tiny_cfg()
    rt = get_runtime(cfg)
    models.set_adapter_state(rt.model, rt.initial_adapter())
    m32 = evaluate(rt.model, rt.eval_dataset, rt.collate, 16, CPU, "classification", "fp32")
    m16 = evaluate(rt.model, rt.eval_dataset, rt.collate, 16, CPU, "classification", "bf16")
    assert abs(m16["eval_loss"] - m32["eval_loss"]) < 0.02 * m32["eval_loss"]
    assert abs(m16["eval_accuracy"] - m32["eval_accuracy"]) <= 2 / len(rt.eval_dataset)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_a_cpu_can_only_emulate_is_named_in_a_warning(tiny_cfg, monkeypatch, caplog, native: bool) -> None:
    """Emulated bf16 ran a MiniLM step 28x slower than fp32: an explicit bf16 on such a CPU gets a warning
    naming the keys; ``auto`` (which picks fp32 there), split learning (which trains in fp32 whatever
    ``train.precision`` says) and a CPU with native bf16 get none."""
    import fedpeft.training
    from fedpeft.runtime import Runtime

    monkeypatch.setattr(fedpeft.training, "cpu_has_native_bf16", lambda: native)
    for overrides, keys in (({"train.precision": "bf16", "model.dtype": "bf16"}, ["train.precision", "model.dtype"]),
                            ({"train.precision": "bf16"}, ["train.precision"]), ({}, []),
                            ({"train.precision": "bf16", "split.enabled": True, "model.tiny_layers": 3}, [])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fedpeft.precision"):
            Runtime(tiny_cfg(**overrides))
        warned = [r.getMessage() for r in caplog.records if "emulates bf16" in r.getMessage()]
        if native or not keys:
            assert warned == []
        else:
            assert len(warned) == 1 and all(k in warned[0] for k in keys), warned
            assert ("model.dtype = 'bf16'" in warned[0]) == ("model.dtype" in keys)
