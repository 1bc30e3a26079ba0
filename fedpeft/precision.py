"""Base-model precision and placement for larger models: ``model.dtype`` (fp32 / bf16 / fp16 base weights),
``model.quantization`` (QLoRA: 4-bit NF4 or 8-bit through bitsandbytes) and ``model.device_map`` (one client
spanning several GPUs through accelerate).

Adapters and trained heads always stay fp32, so optimizer state, deltas and the wire are unchanged. What a
machine cannot do is refused by :func:`check_hardware` before anything loads (docs/gpu.md says what has run on
a GPU and what has not).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from fedpeft.config import Config, ModelSection
from fedpeft.errors import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # model.dtype


def _quantization_missing(device: torch.device | None) -> list[str]:
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA device (torch.cuda.is_available() is False here)")
    elif device is not None and device.type != "cuda":
        missing.append(f"run.device = 'cuda' or 'auto' (the run uses {device.type!r})")
    return missing


def check_hardware(cfg: ModelSection, device: torch.device) -> None:
    """Refuse, before anything loads, what ``device`` cannot do: fp16 base weights on the CPU (no fast fp16 kernels
    and no loss scaling there), 4/8-bit QLoRA without bitsandbytes or CUDA, a GPU ``device_map`` without CUDA or
    accelerate. ``device_map = 'auto'`` without CUDA keeps the whole model on the CPU."""
    if cfg.dtype == "fp16" and device.type == "cpu":
        raise ConfigError("model.dtype = 'fp16' runs on a GPU only; this run's device is the CPU: use model.dtype = "
                          "'bf16' or 'fp32' here (or run.device = 'cuda' on a machine with one)")
    if cfg.quantization != "none":
        missing = _quantization_missing(device)
        if missing:
            raise ConfigError(f"model.quantization = {cfg.quantization!r} (QLoRA through bitsandbytes) needs "
                              f"{' and '.join(missing)}; use model.quantization = 'none' on this machine")
    if cfg.device_map and device.type != "cuda":
        if cfg.device_map == "auto":
            log.info("model.device_map = 'auto' without a CUDA device: the whole model stays on the %s", device.type)
            return
        raise ConfigError(f"model.device_map = {cfg.device_map!r} spreads the model over CUDA GPUs, but this run's "
                          f"device is {device.type!r}: leave model.device_map empty (or 'auto', which means the "
                          "CPU here)")
    if cfg.device_map and importlib.util.find_spec("accelerate") is None:
        raise ConfigError(f"model.device_map = {cfg.device_map!r} needs the accelerate package (pip install "
                          "accelerate); or leave model.device_map empty")


def warn_emulated_bf16(cfg: Config, device: torch.device) -> None:
    """Warn (once per model load) when ``cfg`` asks for bf16 compute on a CPU without native bf16 (AVX512-BF16 or
    AMX-BF16), naming the keys.

    torch emulates bf16 there: on a 2-core EPYC without it, a bf16 ``torch.mm`` at MiniLM's shapes ran at 1.3
    GFLOP/s against 162 in fp32 and a MiniLM training step under bf16 autocast took 30.4 s against 1.07 s
    (docs/performance.md). ``train.precision = "auto"`` never does this; an explicit ``bf16`` does.
    """
    from fedpeft.training import cpu_has_native_bf16

    if device.type != "cpu" or cpu_has_native_bf16():
        return
    keys = []
    if cfg.model.dtype == "bf16":
        keys.append("model.dtype = 'bf16'")
    if cfg.train.precision == "bf16" and not cfg.split.enabled:  # split learning never autocasts
        keys.append("train.precision = 'bf16'")
    if keys:
        log.warning("%s on a CPU without native bf16 (no AVX512-BF16 / AMX-BF16 in /proc/cpuinfo): torch emulates "
                    "bf16 here, measured about 28x slower than fp32 for a MiniLM training step; use "
                    "train.precision = 'auto' and model.dtype = 'fp32' on this machine", " and ".join(keys))


def placement(cfg: ModelSection) -> dict:
    """from_pretrained arguments for dtype, QLoRA quantization and a multi-GPU device map."""
    if cfg.quantization == "none":
        kwargs: dict = {"dtype": DTYPES[cfg.dtype]}
        if cfg.device_map and torch.cuda.is_available():
            kwargs["device_map"] = cfg.device_map
        return kwargs
    missing = _quantization_missing(None)
    if missing:  # also reached by callers that never resolved a device (export)
        raise ConfigError(f"model.quantization = {cfg.quantization!r} needs {' and '.join(missing)}")
    from transformers import BitsAndBytesConfig

    compute = DTYPES[cfg.dtype] if cfg.dtype != "fp32" else torch.bfloat16
    if cfg.quantization == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "dtype": compute,
            "device_map": cfg.device_map or {"": torch.cuda.current_device()}}


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``, unless accelerate / bitsandbytes placed it already (``device_map``, QLoRA)."""
    if getattr(model, "hf_device_map", None):
        return model
    return model.to(device)


def _cast_input(module: nn.Module, args: tuple) -> tuple:
    weight = getattr(module, "weight", None)
    if weight is None:
        return args
    return tuple(a.to(weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def fp32_trainables(model: nn.Module) -> None:
    """Over bf16/fp16 (or quantized) base weights, keep every trainable tensor in fp32 (the optimizer's state
    and the wire stay exact); a trained head (a full copy peft makes) gets its input cast to its own dtype."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    for name, module in model.named_modules():
        if name.endswith(("modules_to_save.default", "classifier", "score")) and \
                any(p.requires_grad for p in module.parameters(recurse=False)) and \
                not getattr(module, "_fedpeft_cast", False):
            module.register_forward_pre_hook(_cast_input)
            module._fedpeft_cast = True
