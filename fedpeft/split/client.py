"""The split client: local training steps of a U-shaped model against any :class:`BodyService`.

One split step: front forward -> ``service.forward`` -> back forward + loss -> backward to the body
output -> ``service.backward`` (the server steps its adapters) -> finish backprop through the front ->
client optimizer step. The loop mirrors :func:`fedpeft.training.train_local` (same seeded batches,
same optimizer and schedule, dropout seeded the same way), so an in-process split run equals the
monolithic run bit for bit in fp32 (``tests/test_split_core.py``).

What is sent is checked by :func:`check_wire`: a forward carries only ``hidden`` (float activations)
and ``attention_mask`` (0/1), a backward only ``grad``. Token ids, labels and logits stay here.

SFPrompt options (Cao et al. 2024):

* **local-loss steps**: after the split steps, ``local_loss_steps`` client-only steps that feed the
  front output straight into the back (the body skipped), as SFPrompt's head+tail local model. They
  train the same client adapters with no server call and no extra parameters to aggregate.
* **EL2N pruning**: score every local example with the client's own head+tail model (no server
  call), ``||softmax(logits) - onehot(y)||_2`` (mean over target tokens for causal LM), and keep the
  highest-scoring ``1 - prune_fraction`` of the examples for the round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fedpeft.config import TrainSection
from fedpeft.errors import SplitError
from fedpeft.split.cut import SplitModel
from fedpeft.split.service import BodyService, Tensors
from fedpeft.training import _batches, _to, dataset_size, make_optimizer, make_schedule, num_local_steps

log = logging.getLogger(__name__)

WIRE_KEYS = {"forward": ("hidden", "attention_mask"), "backward": ("grad",)}
HEADER_ESTIMATE = 24 + 16  # per tensor when split.frames is missing: dtype, shape, length, name


def check_wire(kind: str, tensors: Tensors) -> None:
    """Refuse anything but activations, their gradients and a 0/1 attention mask (never ids, labels, logits)."""
    allowed = WIRE_KEYS.get(kind)
    if allowed is None or set(tensors) != set(allowed):
        raise SplitError(f"a split {kind} may carry exactly {allowed}, not {sorted(tensors)}")
    for name, t in tensors.items():
        if name == "attention_mask":
            if t.dim() != 2 or not bool(((t == 0) | (t == 1)).all()):
                raise SplitError("attention_mask must be a 2-D tensor of zeros and ones")
        elif not t.is_floating_point() or t.dim() != 3:
            raise SplitError(f"{name!r} must be a 3-D float tensor [B, T, H], got {tuple(t.shape)} {t.dtype}")


def wire_bytes(tensors: Tensors, wire_dtype: str | None = None, client_id: str = "", request: bool = False) -> int:
    """Bytes of one frame carrying ``tensors`` (a ``request`` also carries the session token):
    ``split.frames.encoded_size`` (exact), or raw bytes plus ``HEADER_ESTIMATE`` per tensor and a
    24-byte frame header if the frame module is unavailable."""
    try:
        from fedpeft.split.frames import TOKEN_CHARS, encoded_size
    except ImportError:  # pragma: no cover - the transport is optional
        item = {"bf16": 2}.get(wire_dtype or "", 0)
        return 24 + len(client_id.encode()) + 32 * request + sum(
            HEADER_ESTIMATE + t.numel() * (item if item and t.dtype in (torch.float32, torch.float64)
                                           else t.element_size()) for t in tensors.values())
    return encoded_size(tensors, wire_dtype, client_id, "0" * TOKEN_CHARS * request)


@dataclass
class SplitOptions:
    """Client-side split options (see the module doc)."""

    activation_noise: float = 0.0   # std of Gaussian noise added to the activations sent
    local_loss_steps: int = 0       # SFPrompt client-only steps per round (body skipped)
    prune_fraction: float = 0.0     # EL2N: drop this fraction of the lowest-scoring examples per round
    wire_dtype: str | None = None   # "bf16" if the transport sends bf16 (used for the byte accounting)


@dataclass
class StepBytes:
    """Frame bytes of one split step (both calls) each way."""

    sent: int
    received: int


@dataclass
class SplitTrainResult:
    """What one split round reports; bytes are frame bytes (``split.frames``) of forward + backward calls."""

    num_examples: int
    steps: int
    local_steps: int
    loss: float
    local_loss: float
    seconds: float
    bytes_sent: int = 0
    bytes_received: int = 0
    kept_examples: int = 0
    step_bytes: list[StepBytes] = field(default_factory=list)


class SplitClient:
    """One data holder's split training against ``service`` (in process or over gRPC)."""

    def __init__(self, model: SplitModel, service: BodyService, client_id: str, train: TrainSection,
                 options: SplitOptions | None = None, device: str | torch.device = "cpu", seed: int = 0) -> None:
        self.model, self.service, self.client_id, self.cfg = model, service, client_id, train
        self.options = options or SplitOptions()
        self.device = torch.device(device)
        self.step = 0  # increases across rounds; the body refuses a step it already applied
        self.noise = torch.Generator().manual_seed(seed * 7919 + 17)  # own stream: leaves dropout's RNG alone
        self.sent_log: list[Tensors] = []  # the last step's outgoing tensors (for inspection in tests)

    # ------------------------------------------------------------------ one step

    def _outgoing(self, hidden: torch.Tensor, mask: torch.Tensor) -> Tensors:
        sent = hidden.detach()
        if self.options.activation_noise > 0:
            noise = torch.randn(sent.shape, generator=self.noise, dtype=sent.dtype) * self.options.activation_noise
            sent = sent + noise.to(sent.device)
        return {"hidden": sent, "attention_mask": mask}

    def split_step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> tuple[float, StepBytes]:
        """One step through the server; the server steps its adapters, ``optimizer`` the client's."""
        optimizer.zero_grad(set_to_none=True)
        hidden, mask = self.model.front(batch["input_ids"], batch["attention_mask"])
        out_msg = self._outgoing(hidden, mask)
        check_wire("forward", out_msg)
        self.step += 1
        reply = self.service.forward(self.client_id, self.step, out_msg)
        body_out = reply.get("hidden")
        if body_out is None or body_out.shape != hidden.shape:
            raise SplitError(f"the body answered {sorted(reply)} with shape "
                             f"{None if body_out is None else tuple(body_out.shape)}; expected 'hidden' "
                             f"{tuple(hidden.shape)}")
        body_out = body_out.to(self.device, hidden.dtype).detach().requires_grad_(True)
        loss, _ = self.model.back(body_out, mask, batch["labels"])
        loss.backward()
        assert body_out.grad is not None  # a leaf the loss depends on
        grad_msg = {"grad": body_out.grad}
        check_wire("backward", grad_msg)
        grad = self.service.backward(self.client_id, self.step, grad_msg).get("grad")
        if grad is None or grad.shape != hidden.shape:
            raise SplitError(f"the body's backward answered no 'grad' of shape {tuple(hidden.shape)}")
        if hidden.requires_grad:  # nothing trainable in the front (e.g. front_layers = 0 with LoRA): done
            hidden.backward(grad.to(hidden.device, hidden.dtype))
        self._clip_and_step(optimizer)
        self.sent_log = [out_msg, grad_msg]
        wd, cid = self.options.wire_dtype, self.client_id
        nbytes = StepBytes(sent=wire_bytes(out_msg, wd, cid, True) + wire_bytes(grad_msg, wd, cid, True),
                           received=wire_bytes({"hidden": body_out}, wd, cid) + wire_bytes({"grad": grad}, wd, cid))
        return float(loss.detach()), nbytes

    def local_step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
        """SFPrompt local-loss step: front output straight into the back; no service call."""
        optimizer.zero_grad(set_to_none=True)
        hidden, mask = self.model.front(batch["input_ids"], batch["attention_mask"])
        loss, _ = self.model.back(hidden, mask, batch["labels"])
        loss.backward()
        self._clip_and_step(optimizer)
        return float(loss.detach())

    def _clip_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.max_grad_norm > 0:  # the client's own parameters only: the server clips its own
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        optimizer.step()

    # ------------------------------------------------------------------ a round

    def train(self, dataset: Dataset, collate: Callable, seed: int, steps: int | None = None) -> SplitTrainResult:
        """One round: EL2N pruning (if set), ``steps`` split steps, then the local-loss steps."""
        start = time.perf_counter()
        opts = self.options
        if opts.prune_fraction > 0:
            dataset = prune_el2n(self.model, dataset, collate, 1.0 - opts.prune_fraction, self.cfg.eval_batch_size,
                                 self.device)
        steps = steps or num_local_steps(self.cfg, dataset_size(dataset))
        params = list(self.model.client_parameters().values())
        optimizer = make_optimizer(params, self.cfg)
        schedule = make_schedule(optimizer, self.cfg, steps + opts.local_loss_steps)
        batches = _batches(dataset, collate, self.cfg.batch_size, torch.Generator().manual_seed(seed))
        result = SplitTrainResult(num_examples=dataset_size(dataset), steps=steps, local_steps=opts.local_loss_steps,
                                  loss=0.0, local_loss=0.0, seconds=0.0, kept_examples=dataset_size(dataset))
        self.service.open(self.client_id, self.model.fingerprint)
        self.model.peft_model.train()  # also modules outside the parts, e.g. GPT-2's embedding dropout
        self.model.front.train()
        self.model.back.train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # dropout, as in train_local
                for _ in range(steps):
                    loss, nbytes = self.split_step(_to(next(batches), self.device), optimizer)
                    schedule.step()
                    result.loss += loss / steps
                    result.step_bytes.append(nbytes)
                for _ in range(opts.local_loss_steps):
                    loss = self.local_step(_to(next(batches), self.device), optimizer)
                    result.local_loss += loss / opts.local_loss_steps
                    schedule.step()
        finally:
            self.model.peft_model.eval()
            self.service.close(self.client_id)
        result.bytes_sent = sum(b.sent for b in result.step_bytes)
        result.bytes_received = sum(b.received for b in result.step_bytes)
        result.seconds = time.perf_counter() - start
        return result


# ---------------------------------------------------------------------- EL2N pruning

@torch.no_grad()
def el2n_scores(model: SplitModel, dataset: Dataset, collate: Callable, batch_size: int = 64,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """EL2N score per example with the client's head+tail model (front -> back, no server call)."""
    model.peft_model.eval()  # the parts and what lies outside them (e.g. GPT-2's embedding dropout)
    scores = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        batch = _to(batch, torch.device(device))
        hidden, mask = model.front(batch["input_ids"], batch["attention_mask"])
        _, logits = model.back(hidden, mask, None)
        scores.append(el2n(logits, batch["labels"], model.task))
    return torch.cat(scores) if scores else torch.zeros(0)


def el2n(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """``||softmax(logits) - onehot(label)||_2`` per example; for causal LM, the mean over target tokens."""
    if task == "classification":
        probs = logits.float().softmax(-1)
        return (probs - torch.nn.functional.one_hot(labels, probs.shape[-1]).float()).norm(dim=-1)
    logits = logits[:, -labels.shape[1]:]  # a soft prompt prepends positions without labels
    probs, target = logits[:, :-1].float().softmax(-1), labels[:, 1:]
    valid = target != -100
    onehot = torch.nn.functional.one_hot(target.clamp(min=0), probs.shape[-1]).float()
    per_token = (probs - onehot).norm(dim=-1) * valid
    return per_token.sum(1) / valid.sum(1).clamp(min=1)


def top_fraction(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Indices of the ``ceil(keep_fraction * N)`` highest scores (ties: lower index first), ascending."""
    if not 0.0 < keep_fraction <= 1.0:
        raise SplitError(f"the kept fraction must be in (0, 1], got {keep_fraction}")
    keep = max(1, math.ceil(keep_fraction * len(scores) - 1e-9))
    order = torch.sort(-scores, stable=True).indices[:keep]
    return torch.sort(order).values


def prune_el2n(model: SplitModel, dataset: Dataset, collate: Callable, keep_fraction: float, batch_size: int = 64,
               device: str | torch.device = "cpu") -> Dataset:
    """The subset of ``dataset`` with the highest EL2N scores (SFPrompt's dataset pruning)."""
    scores = el2n_scores(model, dataset, collate, batch_size, device)
    keep = top_fraction(scores, keep_fraction)
    log.info("EL2N pruning kept %d of %d examples", len(keep), len(scores))
    return Subset(dataset, keep.tolist())
