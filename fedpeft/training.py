"""Local training and evaluation loops on plain torch (used by clients, the server's evaluation,
split learning and the attacks).

Deterministic on CPU: batches are drawn from a generator seeded per (run seed, round, client), so
the same configuration gives the same metrics whichever engine runs it and whether or not the run
was interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpeft.config import TrainSection

log = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """cuda > mps > cpu for 'auto'; an explicit choice that is unavailable falls back to cpu with a warning."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if preference in ("auto", "mps") and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    if preference not in ("auto", "cpu"):
        log.warning("device %r is not available here; using cpu", preference)
    return torch.device("cpu")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one: ``taskset``, a container's
    cpuset), not every core of the machine: more torch threads than that only contend."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def set_threads(threads: int, workers: int = 1) -> int:
    """Set torch's intra-op threads: ``threads`` if given, else the usable cores divided among the workers."""
    n = threads or max(1, usable_cores() // max(1, workers))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16, read from Linux's
    /proc/cpuinfo once per process: every training and evaluation call asks): there bf16 autocast is faster than
    fp32; elsewhere torch emulates bf16 and is slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "gpu", dp: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: plain fp32).

    ``gpu`` and ``auto`` autocast on a CUDA GPU to bf16, or fp16 where it has no bf16 (then :func:`loss_scaler`
    scales the loss in :func:`train_local`); ``auto`` also uses bf16 on a CPU with native bf16, except under DP-SGD
    (Opacus' per-example gradients are not measured under CPU autocast).
    """
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" or torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" or (precision == "auto" and not dp and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (see :func:`autocast_dtype`); nothing for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def loss_scaler(device: torch.device, dtype: torch.dtype | None, dp: object | None = None) -> torch.amp.GradScaler:
    """A GradScaler, enabled where the training autocast runs in fp16 (``dtype``, from :func:`autocast_dtype`; its
    small gradients underflow without scaling); disabled (a pass-through) under bf16/fp32 and under DP-SGD (Opacus
    clips unscaled per-example gradients)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and dp is None)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def dataset_size(dataset: Dataset[Any]) -> int:
    """``len(dataset)``: every dataset loaded here is map-style and sized (shuffling needs the length),
    but torch's ``Dataset`` type does not declare ``__len__``."""
    return len(cast(Sized, dataset))


def _batches(dataset: Dataset, collate: Callable, batch_size: int, generator: torch.Generator) -> Iterator[dict]:
    """Endless shuffled batches (a new permutation each epoch, drawn from ``generator``)."""
    while True:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)


def num_local_steps(cfg: TrainSection, num_examples: int) -> int:
    """Optimizer steps in one round: ``local_steps``, or ``local_epochs`` worth of batches."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    return max(1, math.ceil(cfg.local_epochs * num_examples / cfg.batch_size))


def client_seed(seed: int, rnd: int, partition_id: int) -> int:
    """The training seed of one client in one round (independent of engine and sampling order)."""
    return (seed * 1_000_003 + rnd * 10_007 + partition_id) % (2**63 - 1)


def make_optimizer(params: list[nn.Parameter], cfg: TrainSection) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainSection, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant / linear decay / cosine decay over ``steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    """What one local training run reports."""

    num_examples: int
    steps: int
    loss: float
    seconds: float
    fisher: dict[str, torch.Tensor] | None = None
    """Mean squared gradient of each trainable element over the steps (the diagonal empirical
    Fisher, after clipping; under DP-SGD of the noised gradients, so using it costs no privacy),
    float32 on the CPU, keyed like :func:`fedpeft.models.adapter_state`; None unless asked for
    (``train_local(fisher=True)``). Compression ranks by it."""
    step_log: list[tuple[int, float, float, float]] = field(default_factory=list)
    """(step, loss, learning rate, gradient norm) of every ``step_every``-th step and the last (experiment
    tracking); the norm is taken before clipping, under DP-SGD of the noised gradient the step used."""


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], per_example_mean: bool) -> torch.Tensor:
    """The model's loss; under DP-SGD a mean over examples (HF's causal-LM loss averages over all
    tokens of the batch, which couples examples and breaks per-example clipping)."""
    out = model(**batch)
    if per_example_mean and "logits" in out and out.logits.dim() == 3:
        from fedpeft.privacy.dpsgd import causal_lm_loss

        return causal_lm_loss(out.logits, batch["labels"])
    return out.loss


def train_local(model: nn.Module, dataset: Dataset, collate: Callable, cfg: TrainSection, device: torch.device,
                seed: int, proximal_mu: float = 0.0, steps: int | None = None, dp: object | None = None,
                fisher: bool = False, grad_hook: Callable[[], None] | None = None, step_every: int = 0,
                on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train the model's trainable parameters in place for one round.

    ``proximal_mu > 0`` adds FedProx's term mu/2 * ||w - w_start||^2 (w_start: the received global).
    ``dp`` (a :class:`fedpeft.privacy.LocalDP`) makes it DP-SGD: Poisson batches, per-example clipping
    and noise by Opacus, accounted in ``dp``. ``fisher=True`` also sums the squared gradients
    (:attr:`TrainResult.fisher`; one adapter-sized buffer and one multiply-add per step). ``grad_hook`` runs
    after each backward pass, before clipping and the step. ``step_every > 0`` fills :attr:`TrainResult.step_log`.
    ``on_step(done, steps)`` is called before each step and after the last (a progress display; fedpeft/progress.py).
    """
    start = time.perf_counter()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    sq_grads = [torch.zeros_like(p, dtype=torch.float32) for p in params] if fisher else []
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    steps = steps or num_local_steps(cfg, dataset_size(dataset))
    optimizer = make_optimizer(params, cfg)
    model.train()
    if dp is not None:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate)
        model, optimizer, dp_loader = dp.make_private(model, optimizer, loader, steps=steps)  # type: ignore[attr-defined]
        batches: Iterator = iter(dp_loader)
    else:
        batches = _batches(dataset, collate, cfg.batch_size, torch.Generator().manual_seed(seed))
    schedule = make_schedule(optimizer, cfg, steps)
    dtype = autocast_dtype(device, cfg.precision, dp is not None)
    scaler = loss_scaler(device, dtype, dp)
    total, counted = 0.0, 0
    step_log: list[tuple[int, float, float, float]] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout
            for step in range(steps):
                if on_step is not None:
                    on_step(step, steps)
                logged = step_every > 0 and (step % step_every == 0 or step == steps - 1)
                batch = next(batches)
                optimizer.zero_grad(set_to_none=True)
                if batch is None:  # an empty Poisson draw: a noise-only step, still accounted
                    dp.empty_step(optimizer)  # type: ignore[union-attr]
                    schedule.step()
                    continue
                batch = _to(batch, device)
                if dp is not None:  # privacy.physical_batch_size: clip all but the last chunk into the sum
                    *early, batch = dp.physical_batches(batch)  # type: ignore[attr-defined]
                    for chunk in early:
                        with autocast(device, dtype):
                            _loss(model, chunk, True).backward()
                        dp.accumulate(optimizer)  # type: ignore[attr-defined]
                with autocast(device, dtype):
                    loss = _loss(model, batch, dp is not None)
                if proximal_mu > 0:
                    loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clipping and the Fisher sums see true gradients
                if grad_hook is not None:  # SCAFFOLD's control-variate correction of the gradients
                    grad_hook()
                lr = float(optimizer.param_groups[0]["lr"])
                norm = _grad_norm(params) if logged and dp is None else 0.0
                if cfg.max_grad_norm > 0 and dp is None:  # DP-SGD clips per example instead
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                if logged:
                    step_log.append((step, float(loss.detach()), lr, norm if dp is None else _grad_norm(params)))
                schedule.step()
                for acc, p in zip(sq_grads, params):  # the gradient the step used (DP-SGD: noised)
                    if p.grad is not None:
                        g = p.grad.float()
                        acc.addcmul_(g, g)
                total += float(loss.detach())
                counted += 1
            if on_step is not None:
                on_step(steps, steps)
    finally:
        if dp is not None:
            dp.release()  # type: ignore[attr-defined]  # the base model is shared: leave no hooks behind
    model.eval()
    return TrainResult(num_examples=dataset_size(dataset), steps=steps, loss=total / max(1, counted),
                       seconds=time.perf_counter() - start,
                       fisher={n: (acc / max(1, counted)).cpu() for (n, _), acc in zip(named, sq_grads)} if fisher
                       else None, step_log=step_log)


def _grad_norm(params: list[nn.Parameter]) -> float:
    """The L2 norm of all parameters' gradients together."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@torch.no_grad()
def evaluate_counts(model: nn.Module, dataset: Dataset, collate: Callable, batch_size: int, device: torch.device,
                    task: str, precision: str = "gpu") -> dict[str, float]:
    """Sums that add up across clients: ``examples``, ``weight`` (examples, or response tokens for a causal LM),
    ``loss_sum`` (mean loss x weight) and ``correct`` (classification); forward passes under ``train.precision``."""
    model.eval()
    dtype = autocast_dtype(device, precision)
    loss_sum, weight, correct, seen = 0.0, 0, 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        batch = _to(batch, device)
        with autocast(device, dtype):
            out = model(**batch)
        seen += batch["labels"].shape[0]
        if task == "classification":
            n = batch["labels"].shape[0]
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(out.loss.float()) * n
        weight += n
    counts = {"examples": float(seen), "weight": float(weight), "loss_sum": loss_sum}
    if task == "classification":
        counts["correct"] = float(correct)
    return counts


def metrics_of_counts(counts: dict[str, float], task: str) -> dict[str, float]:
    """Loss and accuracy (classification) or loss and perplexity (causal LM) from :func:`evaluate_counts` sums."""
    loss = counts["loss_sum"] / max(1.0, counts["weight"])
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": counts["correct"] / max(1.0, counts["examples"])}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def evaluate(model: nn.Module, dataset: Dataset, collate: Callable, batch_size: int, device: torch.device,
             task: str, precision: str = "gpu") -> dict[str, float]:
    """Loss and accuracy (classification) or loss and perplexity (causal LM, over response tokens)."""
    return metrics_of_counts(evaluate_counts(model, dataset, collate, batch_size, device, task, precision), task)
