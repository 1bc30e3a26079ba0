"""What an honest-but-curious server sees (:class:`Observation`), what an attack returns
(:class:`AttackResult`), and the attack registry.

Ground truth (the client's private token ids / labels) is never part of an Observation: it reaches
only :mod:`fedpeft.attacks.metrics`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn

from fedpeft.registry import Registry

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
T = TypeVar("T")


def public_schedule(train: Any) -> str:
    """The client's learning-rate schedule as an :class:`Observation` names it (from a ``TrainSection``)."""
    return train.schedule if not train.warmup_steps else f"{train.schedule} after warm-up"


def config_dropout(model: nn.Module) -> float:
    """The fraction of a first-block LoRA input's coordinates that dropout zeroes while a client trains, from
    the public configs: the base model's embedding / hidden dropout (``hidden_dropout_prob``, ``embd_pdrop``)
    combined with the LoRA dropout, 1 − (1 − p_model)(1 − p_lora). Attention dropout does not reach the inputs."""
    cfg = getattr(model, "config", None)
    p_model = max(float(getattr(cfg, key, 0.0) or 0.0) for key in ("hidden_dropout_prob", "embd_pdrop"))
    p_lora = max((float(m.p) for n, m in model.named_modules() if ".lora_dropout." in n and isinstance(m, nn.Dropout)),
                 default=0.0)
    return 1.0 - (1.0 - p_model) * (1.0 - p_lora)


class NotApplicable(ValueError):
    """The attack does not apply to this observation (e.g. a span attack on a soft prompt)."""


@dataclass
class Observation:
    """Everything the server knows about one client's update.

    ``model``: the peft model (architecture + frozen base weights; its adapter values are ignored,
    attacks load ``global_state`` themselves). ``global_state``: the global adapter the client started
    from (names as :func:`fedpeft.models.adapter_state`). ``update``: the update as received — a
    single-step gradient (``kind="gradient"``, dL/dθ) or a multi-step delta (``kind="delta"``,
    θ_local − θ_global), possibly compressed or noised. ``history``: earlier (global_state, update)
    pairs of the same client. The remaining fields are public metadata; ``dropout``: the fraction of a
    first-block LoRA input's coordinates the client's dropout zeroes while it trains (model and LoRA
    dropout combined, 1 − (1 − p_model)(1 − p_lora); read from the public model and adapter config);
    ``weight_decay``: the public optimizer's (decoupled for AdamW, an L2 term for SGD); ``max_grad_norm``: the
    client's clip of the gradient's total norm before each step (0 = none); ``schedule``: its learning-rate
    schedule (``constant``, ``linear``, ``cosine``, "... after warm-up").
    """

    model: nn.Module
    global_state: State
    update: State
    kind: str = "gradient"
    history: list[tuple[State, State]] = field(default_factory=list)
    batch_size: int = 1
    num_examples: int = 1
    seq_len: int = 16
    local_steps: int = 1
    lr: float = 1.0
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    schedule: str = "constant"
    task: str = "causal_lm"
    dropout: float = 0.0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _shared: set[str] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("gradient", "delta"):
            raise ValueError(f"Observation.kind must be 'gradient' or 'delta', got {self.kind!r}")

    @classmethod
    def from_round(cls, model: nn.Module, global_state: State, delta: State, train: Any, num_examples: int,
                   seq_len: int, task: str = "causal_lm", history: list[tuple[State, State]] | None = None,
                   local_steps: int | None = None) -> Observation:
        """The observation of one federated reply: ``delta`` is the decoded update (local − global) as the
        server received it, ``train`` the public :class:`fedpeft.config.TrainSection` of the run,
        ``history`` earlier (global, decoded delta) pairs of the same client (cross-silo stacking). Clients train
        with dropout on: ``dropout`` comes from the model's config (:func:`config_dropout`)."""
        return cls(model=model, global_state=global_state, update=delta, kind="delta", history=list(history or []),
                   batch_size=train.batch_size, num_examples=num_examples, seq_len=seq_len,
                   local_steps=local_steps or train.local_steps or 1, lr=train.lr, optimizer=train.optimizer,
                   weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
                   schedule=public_schedule(train), task=task, dropout=config_dropout(model))

    @property
    def token_bound(self) -> int:
        """Public upper bound on the client's token count (examples × sequence length)."""
        return max(1, max(self.num_examples, self.batch_size) * self.seq_len)

    def updates(self) -> list[tuple[State, State]]:
        """All (global_state, update) pairs of this client, oldest first, the current one last."""
        return [*self.history, (self.global_state, self.update)]

    def as_gradient(self, update: State | None = None) -> State:
        """The update rescaled to gradient units: a delta ≈ −lr·steps·gradient (SGD)."""
        update = self.update if update is None else update
        if self.kind == "gradient":
            return update
        scale = -1.0 / max(self.lr * self.local_steps, 1e-12)
        return {k: v * scale for k, v in update.items()}

    def memo(self, key: str, compute: Callable[[], T], shared: bool = False) -> T:
        """``compute()``, once per observation (kept under ``key``). ``shared``: the value depends only on
        the frozen base model and the adapter's layout (which modules are adapted), not on adapter values or
        the update, so it may be handed to other observations of the same model (:meth:`shared_values`)."""
        if key not in self._cache:
            self._cache[key] = compute()
        if shared:
            self._shared.add(key)
        return self._cache[key]

    def shared_values(self) -> dict[str, Any]:
        """The values memoised with ``shared=True`` (e.g. the span attacks' candidate first-layer inputs,
        a forward pass per vocabulary token): a server attacking many clients of one base model computes
        them once and passes them on with :meth:`adopt`."""
        return {k: self._cache[k] for k in self._shared}

    def adopt(self, values: dict[str, Any]) -> None:
        """Take over ``shared_values()`` of another observation of the same base model and LoRA targets."""
        self._cache.update(values)
        self._shared.update(values)

    def working_model(self, dtype: torch.dtype = torch.float64) -> PeftModel:
        """A private copy of the model in ``dtype`` with the global adapter loaded (cached, eval mode)."""
        return self.memo(f"model:{dtype}", lambda: self._load(dtype))

    def _load(self, dtype: torch.dtype) -> PeftModel:
        from fedpeft.models import set_adapter_state

        m = copy.deepcopy(self.model).to(dtype)
        set_adapter_state(m, {k: v.to(dtype) for k, v in self.global_state.items()})
        m.eval()
        return cast("PeftModel", m)


@dataclass
class AttackResult:
    """What an attack recovered.

    ``token_scores``: one score per vocabulary token (higher = more likely in the batch).
    ``position_scores``: optional (seq_len × vocab) scores for learned-position models.
    ``bag``: the recovered set of token ids; ``sequences``: recovered sequences (may be empty).
    ``labels``: recovered class labels (classification heads). ``extra``: attack-specific numbers.
    """

    attack: str
    token_scores: torch.Tensor | None = None
    position_scores: torch.Tensor | None = None
    bag: list[int] = field(default_factory=list)
    sequences: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


AttackFn = Callable[..., AttackResult]
ATTACKS: Registry[AttackFn] = Registry("attack")


def register_attack(name: str) -> Callable[[AttackFn], AttackFn]:
    """Register ``run(obs, **params) -> AttackResult`` under ``name``."""
    return ATTACKS.register(name)


def run_attack(name: str, obs: Observation, **params: Any) -> AttackResult:
    """Run the registered attack ``name`` on ``obs``; fills in the runtime."""
    fn = ATTACKS.get(name)
    start = time.perf_counter()
    result = fn(obs, **params)
    result.seconds = time.perf_counter() - start
    log.info("attack %s: %.2fs, %d tokens, %d sequences", name, result.seconds, len(result.bag),
             len(result.sequences))
    return result
