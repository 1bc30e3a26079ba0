"""Split learning as one optional object the round asks: :func:`split_of` returns it, or None.

The server loop and the ClientApp ask the same :class:`SplitPlugin` (one per runtime, so the in-process
engine's server and virtual clients share the cut model and the body server):

- which adapter tensors travel: only the client side (front + back); the runtime is told at the cut,
  so its layout and initial adapter hold just those;
- a client's round: :meth:`SplitPlugin.train_round`, through the body service;
- the server's checkpoint: the in-process body's adapters and optimizer (:meth:`state` / :meth:`restore`);
- the model to evaluate and save: the client side plus the in-process body's adapters, or None with a
  remote split server (its adapters live there).

``fedpeft.runtime`` knows nothing of split learning; this module plugs into it.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from fedpeft.training import TrainResult

if TYPE_CHECKING:
    from fedpeft.runtime import Runtime
    from fedpeft.split.body import BodyServer
    from fedpeft.split.cut import SplitModel
    from fedpeft.split.service import BodyService

State = dict[str, torch.Tensor]
#: the split metrics a client reports beside its update (bytes through the body, steps, plain-FL size)
REPORTED = ("split_bytes_up", "split_bytes_down", "split_steps", "split_local_steps", "fl_adapter_bytes_fp32")


class SplitPlugin:
    """The cut model and the body service of one runtime, and what the round asks of them."""

    def __init__(self, rt: Runtime) -> None:
        from fedpeft.split.federated import cut_for

        self.rt = rt
        self.model: SplitModel = cut_for(rt.cfg, rt.model)
        # only the client side travels; a freed body keeps no initial copy of its adapter either
        rt.restrict_adapter(self.model.client_parameters().keys(), drop_others=self.model.body_freed)

    @cached_property
    def service(self) -> BodyService:
        """The split server's body: in process (shared by every virtual client), or a gRPC proxy."""
        from fedpeft.split.federated import make_service

        return make_service(self.rt.cfg, self.model)

    @property
    def body(self) -> BodyServer | None:
        """The in-process body server (checkpointed with the run), or None with a remote split server."""
        from fedpeft.split.body import BodyServer

        if self.rt.cfg.split.address:  # remote: no need to build the gRPC proxy to know
            return None
        return self.service if isinstance(self.service, BodyServer) else None

    def train_round(self, client_id: str, dataset: Dataset, global_state: State,
                    seed: int) -> tuple[TrainResult, State, dict[str, float]]:
        """One SplitFed round of a client: (train result, new client-side state, reported metrics)."""
        from fedpeft.split.federated import train_split_round

        sr = train_split_round(self.rt.cfg, self.model, self.service, client_id, dataset, self.rt.collate,
                               global_state, seed, self.rt.device)
        result = TrainResult(num_examples=sr.num_examples, steps=int(sr.metrics["split_steps"]),
                             loss=sr.metrics["train_loss"], seconds=sr.metrics["split_seconds"])
        return result, sr.state, {k.replace("_", "-"): sr.metrics[k] for k in REPORTED}

    def reset(self) -> None:
        """Start a run from the initial body adapters (the in-process body outlives runs in this process)."""
        if self.body is not None:
            self.body.reset()

    def state(self) -> tuple[dict[str, torch.Tensor], Any] | None:
        """The in-process body's adapters and optimizer for the server checkpoint (None: nothing to keep)."""
        return self.body.state_dict() if self.body is not None else None

    def restore(self, tensors: dict[str, torch.Tensor], extra: Any) -> None:
        """Continue the in-process body from :meth:`state`."""
        if self.body is not None:
            self.body.load_state_dict(tensors, extra)

    def model_state(self, client_state: State) -> State | None:
        """The whole adapter to evaluate and save, or None when the body's adapters are remote."""
        from fedpeft.split.federated import eval_state

        return None if self.body is None else eval_state(self.model, self.body, client_state)


def split_of(rt: Runtime) -> SplitPlugin | None:
    """The runtime's split plug-in when ``[split] enabled``, else None (built once per runtime)."""
    if not rt.cfg.split.enabled:
        return None
    return rt.plugin("split", lambda: SplitPlugin(rt))
