"""The server side of split learning, in process: :class:`BodyServer` implements :class:`BodyService`.

It holds the middle blocks of a cut model (``split.cut``) and the server-side adapters on them,
either one set per client (``server_adapters = "per_client"``) or one set that every client trains
(``"shared"``), each with its own optimizer (the ``TrainSection`` optimizer and learning rate; the
learning rate stays constant on the server, which does not know the clients' schedules).

A forward keeps the autograd graph for ``(client_id, step)`` until its backward, which backpropagates
the client's output gradient, steps that set of adapters and returns the gradient of the client's
activations. With shared adapters another client may have stepped them in between: the graph is
then stale (its saved weights were changed in place), so the body recomputes that forward with the
current adapters before backpropagating (asynchronous SGD, as in SplitFed with a shared server).

Thread-safe (``thread_safe = True``): one lock per adapter set, so per-client sets train in
parallel and the shared set serializes. ``save(path)`` / ``load(path)`` write safetensors + JSON
(adapters, optimizer state, step counters; nothing pickled) so a restarted server resumes exactly.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedpeft.config import TrainSection
from fedpeft.errors import SplitError
from fedpeft.split.cut import BodyPart, SplitModel, clone_body
from fedpeft.split.service import Tensors
from fedpeft.training import make_optimizer

log = logging.getLogger(__name__)

SHARED = "__shared__"
MODES = ("per_client", "shared")
_OPT_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


@dataclass
class _Pending:
    inp: torch.Tensor        # the received activations (a leaf that collects dL/dh)
    out: torch.Tensor        # the body output, graph attached
    mask: torch.Tensor
    version: int             # optimizer steps of the adapter set when the graph was built


@dataclass
class _Slot:
    """One set of server-side adapters with its optimizer."""

    body: BodyPart
    params: dict[str, torch.nn.Parameter]   # monolithic name -> parameter
    optimizer: torch.optim.Optimizer | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0


@dataclass
class _Session:
    pending: OrderedDict[int, _Pending] = field(default_factory=OrderedDict)
    last_step: int | None = None   # last step whose backward was applied in this session


class BodyServer:
    """The in-process body service (see the module doc); wrap it with ``split.server.serve`` for gRPC."""

    thread_safe = True

    def __init__(self, body: BodyPart, fingerprint: str, names: dict[str, str], train: TrainSection,
                 server_adapters: str = "per_client", device: str | torch.device = "cpu", max_pending: int = 4) -> None:
        if server_adapters not in MODES:
            raise SplitError(f"server_adapters = {server_adapters!r}; choose one of: {', '.join(MODES)}")
        self.fingerprint, self.names, self.train_cfg, self.mode = fingerprint, names, train, server_adapters
        self.device, self.max_pending = torch.device(device), max_pending
        self._template = body
        # the template's adapters as they are now: new sets start here even if the template's module is later
        # overwritten (in process it is shared with the run's model, which evaluation loads trained adapters into)
        self._initial = {n: p.detach().clone() for n, p in body.named_parameters() if n in names}
        self.hidden_size = int(body._stack.config.hidden_size)
        self._dtype = next(body.parameters()).dtype  # what a forward's activations must be
        self.max_seq_len = 0  # tokens per sequence a forward may carry (the split server sets it); 0 = unbounded
        self._slots: dict[str, _Slot] = {}
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_split(cls, split: SplitModel, train: TrainSection, server_adapters: str = "per_client",
                   device: str | torch.device = "cpu") -> BodyServer:
        """A body server for the body of ``split`` (its adapters start from the body's current values)."""
        return cls(split.body, split.fingerprint, split.body_names(), train, server_adapters, device)

    # ------------------------------------------------------------------ adapter sets

    def _new_slot(self) -> _Slot:
        body = clone_body(self._template).to(self.device)
        body.train()
        with torch.no_grad():
            for n, p in body.named_parameters():
                if n in self._initial:
                    p.copy_(self._initial[n])
        params = {self.names[n]: p for n, p in body.named_parameters() if n in self.names}
        optimizer = make_optimizer(list(params.values()), self.train_cfg) if params else None
        return _Slot(body, params, optimizer)

    def _slot(self, client_id: str) -> _Slot:
        key = client_id if self.mode == "per_client" else SHARED
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = self._new_slot()
            return slot

    def adapter_state(self, client_id: str | None = None) -> dict[str, torch.Tensor]:
        """A copy of the server adapters (monolithic names) used for ``client_id`` (any client if shared)."""
        if client_id is None and self.mode == "per_client":
            raise SplitError("per-client server adapters: name the client")
        slot = self._slot(client_id or SHARED)
        with slot.lock:
            return {n: p.detach().to("cpu", torch.float32).clone() for n, p in slot.params.items()}

    def reset(self) -> None:
        """Forget every adapter set and session (a new run on the same in-process body)."""
        with self._lock:
            self._slots, self._sessions = {}, {}

    def mean_adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The server adapters to evaluate with: the shared set, or the mean of the per-client sets.

        None before any client has opened a session (the body still has its initial adapters).
        """
        with self._lock:
            slots = list(self._slots.values())
        if not slots:
            return None
        states = []
        for slot in slots:
            with slot.lock:
                states.append({n: p.detach().to("cpu", torch.float32).clone() for n, p in slot.params.items()})
        return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}

    # ------------------------------------------------------------------ BodyService

    def open(self, client_id: str, fingerprint: str) -> None:
        """Start (or rejoin) a session; the adapters of a known client are kept."""
        if fingerprint != self.fingerprint:
            raise SplitError(f"client {client_id!r} has model/cut fingerprint {fingerprint!r}, but this split server "
                             f"holds {self.fingerprint!r}: use the same model, adapter config and cut points")
        self._slot(client_id)
        with self._lock:
            self._sessions[client_id] = _Session()
        log.debug("split session opened for %s", client_id)

    def _session(self, client_id: str, what: str) -> _Session:
        with self._lock:
            session = self._sessions.get(client_id)
        if session is None:
            raise SplitError(f"{what} from client {client_id!r} without an open session; call open() first")
        return session

    def forward(self, client_id: str, step: int, tensors: Tensors) -> Tensors:
        """Run the body on ``hidden`` with the client's ``attention_mask``; keep the graph for the backward."""
        session = self._session(client_id, "forward")
        hidden, mask = self._check_forward(client_id, step, tensors)
        if session.last_step is not None and step <= session.last_step:
            raise SplitError(f"forward of client {client_id!r} step {step}: step {session.last_step} was already "
                             f"applied in this session; steps must increase")
        slot = self._slot(client_id)
        with slot.lock:
            inp = hidden.to(self.device).detach().requires_grad_(True)
            mask = mask.to(self.device)
            with torch.enable_grad():
                out = slot.body(inp, mask)
            if not bool(torch.isfinite(out).all()):  # finite but absurd activations (1e20) overflow in the body
                raise SplitError(f"forward of client {client_id!r} step {step}: the body's output is not finite for "
                                 "these activations; refused")
            session.pending[step] = _Pending(inp, out, mask, slot.version)
            session.pending.move_to_end(step)
            while len(session.pending) > self.max_pending:
                dropped, _ = session.pending.popitem(last=False)
                log.warning("client %s: dropped the unanswered forward of step %d", client_id, dropped)
        return {"hidden": out.detach().to("cpu")}

    def backward(self, client_id: str, step: int, tensors: Tensors) -> Tensors:
        """Backpropagate ``grad`` (dL/d body output), step the adapters, return ``grad`` = dL/d activations."""
        session = self._session(client_id, "backward")
        if not session.pending:
            raise SplitError(f"backward from client {client_id!r} step {step} without a forward")
        pending = session.pending.get(step)
        if pending is None:
            raise SplitError(f"backward from client {client_id!r} for step {step}, but the forwards awaiting a "
                             f"backward are steps {list(session.pending)}")
        if set(tensors) != {"grad"}:
            raise SplitError(f"a backward carries exactly 'grad', got {sorted(tensors)}")
        grad = tensors["grad"]
        if grad.shape != pending.out.shape or not grad.is_floating_point():
            raise SplitError(f"backward grad of client {client_id!r} has shape {tuple(grad.shape)} {grad.dtype}; the "
                             f"forward of step {step} produced {tuple(pending.out.shape)}")
        slot = self._slot(client_id)
        with slot.lock:
            out, inp = pending.out, pending.inp
            if pending.version != slot.version:  # shared adapters stepped since: rebuild the graph
                inp = inp.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = slot.body(inp, pending.mask)
            if slot.optimizer is not None:
                slot.optimizer.zero_grad(set_to_none=True)
            out.backward(grad.to(device=out.device, dtype=out.dtype))
            if slot.optimizer is not None:
                self._step(slot, client_id, step)
            grad_in = inp.grad
            assert grad_in is not None  # the received activations: a leaf the body output depends on
        for s in [s for s in session.pending if s <= step]:
            del session.pending[s]
        session.last_step = step
        return {"grad": grad_in.detach().to("cpu")}

    def _step(self, slot: _Slot, client_id: str, step: int) -> None:
        """Clip and apply the adapters' gradients, unless one is not finite (a gradient of 3e38 is finite on the
        wire and overflows in the body): then nothing is applied and :class:`SplitError` answers the client. With
        shared adapters one client's step is every client's model."""
        assert slot.optimizer is not None
        params = list(slot.params.values())
        if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
            slot.optimizer.zero_grad(set_to_none=True)
            raise SplitError(f"backward of client {client_id!r} step {step}: the adapters' gradient is not finite; "
                             "nothing applied")
        if self.train_cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.train_cfg.max_grad_norm)
        slot.optimizer.step()
        slot.version += 1

    def close(self, client_id: str) -> None:
        """End the session: free its pending graphs (the client's adapters stay for its next session)."""
        with self._lock:
            self._sessions.pop(client_id, None)

    def _check_forward(self, client_id: str, step: int, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        if set(tensors) != {"hidden", "attention_mask"}:
            raise SplitError(f"a forward carries exactly 'hidden' and 'attention_mask', got {sorted(tensors)}")
        hidden, mask = tensors["hidden"], tensors["attention_mask"]
        if (hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size or not hidden.is_floating_point()
                or mask.shape != hidden.shape[:2]):
            raise SplitError(f"forward of client {client_id!r} step {step}: hidden {tuple(hidden.shape)} "
                             f"{hidden.dtype} and attention_mask {tuple(mask.shape)} must be "
                             f"[B, T, {self.hidden_size}] floats and [B, T]")
        if hidden.dtype != self._dtype:
            raise SplitError(f"forward of client {client_id!r} step {step}: hidden is {hidden.dtype}, this body "
                             f"computes in {self._dtype} (the bf16 wire arrives in the sender's own dtype)")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise SplitError(f"forward of client {client_id!r} step {step}: attention_mask must hold only 0 and 1")
        if self.max_seq_len and hidden.shape[1] > self.max_seq_len:
            raise SplitError(f"forward of client {client_id!r} step {step}: {hidden.shape[1]} tokens per sequence, "
                             f"this body takes at most {self.max_seq_len} (the model's max_length)")
        return hidden, mask

    # ------------------------------------------------------------------ state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata): every adapter set with its optimizer state and step counters."""
        tensors: dict[str, torch.Tensor] = {}
        slots = []
        with self._lock:
            items = list(self._slots.items())
        for i, (key, slot) in enumerate(items):
            with slot.lock:
                for n, p in slot.params.items():
                    tensors[f"{i}.param.{n}"] = p.detach().to("cpu").clone()
                    state = slot.optimizer.state.get(p, {}) if slot.optimizer else {}
                    for k, v in state.items():
                        if isinstance(v, torch.Tensor):
                            tensors[f"{i}.opt.{k}.{n}"] = v.detach().to("cpu").clone()
                slots.append({"key": key, "index": i, "version": slot.version})
        meta = {"format": 1, "fingerprint": self.fingerprint, "mode": self.mode,
                "optimizer": self.train_cfg.optimizer, "slots": slots}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what :meth:`state_dict` returned (fingerprint and mode must match); sessions start closed."""
        if meta.get("fingerprint") != self.fingerprint or meta.get("mode") != self.mode:
            raise SplitError(f"saved split body state is for {meta.get('fingerprint')!r} ({meta.get('mode')}), this "
                             f"server holds {self.fingerprint!r} ({self.mode})")
        slots: dict[str, _Slot] = {}
        for entry in meta["slots"]:
            slot, i = self._new_slot(), int(entry["index"])
            with torch.no_grad():
                for n, p in slot.params.items():
                    saved = tensors.get(f"{i}.param.{n}")
                    if saved is None or saved.shape != p.shape:
                        raise SplitError(f"saved split body state lacks {n} (or its shape differs)")
                    p.copy_(saved)
                    state = {k: tensors[f"{i}.opt.{k}.{n}"] for k in _OPT_KEYS if f"{i}.opt.{k}.{n}" in tensors}
                    state = {k: v if k == "step" else v.to(self.device) for k, v in state.items()}
                    if state and slot.optimizer is not None:
                        slot.optimizer.state[p] = state
            slot.version = int(entry["version"])
            slots[str(entry["key"])] = slot
        with self._lock:
            self._slots, self._sessions = slots, {}

    def save(self, path: str | Path) -> None:
        """Write ``path/body.safetensors`` and ``path/body.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_dict()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "body.safetensors"))
        (path / "body.json").write_text(json.dumps(meta, indent=1))

    def load(self, path: str | Path) -> None:
        """Read what :meth:`save` wrote."""
        path = Path(path)
        try:
            meta = json.loads((path / "body.json").read_text())
            tensors = load_file(str(path / "body.safetensors"))
        except (OSError, ValueError) as exc:
            raise SplitError(f"cannot read the split body state in {path}: {exc}") from exc
        self.load_state_dict(tensors, meta)
        log.info("loaded split body state from %s (%d adapter sets)", path, len(meta["slots"]))
