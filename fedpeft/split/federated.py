"""SplitFed glue: one client's split round from a fedpeft :class:`Config` with ``[split] enabled = true``.

The ClientApp receives the global *client-side* adapter (front + back, what the Flower server
aggregates), trains one round through the body service, and returns the new client-side state with
metrics. The body's adapters stay on the split server (per client or shared). Flower-free: the
ClientApp (``fedpeft/clients/``) calls :func:`train_split_round`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from fedpeft.config import Config
from fedpeft.errors import SplitError
from fedpeft.split.body import BodyServer
from fedpeft.split.client import SplitClient, SplitOptions
from fedpeft.split.cut import SplitModel, cut_model
from fedpeft.split.service import BodyService

log = logging.getLogger(__name__)


def split_options(cfg: Config) -> SplitOptions:
    """The client options of ``cfg.split``."""
    s = cfg.split
    return SplitOptions(activation_noise=s.activation_noise, local_loss_steps=s.local_loss_steps,
                        prune_fraction=s.prune_fraction, wire_dtype=None if s.wire_dtype == "fp32" else s.wire_dtype)


def cut_for(cfg: Config, peft_model: nn.Module) -> SplitModel:
    """Cut the (runtime's) peft model at ``cfg.split``'s cut points; parameters stay shared with it.

    With a remote split server (``split.address`` set) the body's weights are then freed in this
    process (:meth:`SplitModel.free_body`): the client keeps only the front and the back. With an
    empty address the in-process body server runs on this very model, so the body stays.
    """
    if not cfg.split.enabled:
        raise SplitError("split.enabled is false")
    split = cut_model(peft_model, cfg.model.task, cfg.split.front_layers, cfg.split.back_layers)
    if cfg.split.address:
        split.free_body()
    return split


def make_service(cfg: Config, split: SplitModel) -> BodyService:
    """A gRPC proxy to ``cfg.split.address``, or an in-process body server when it is empty."""
    if cfg.split.address:
        from fedpeft.split.transport import GrpcBody  # the wire; grpc stays out of this module

        return GrpcBody(cfg.split.address, ca_cert=cfg.split.ca_cert or None,
                        client_cert=cfg.split.client_cert or None, client_key=cfg.split.client_key or None,
                        wire_dtype=None if cfg.split.wire_dtype == "fp32" else cfg.split.wire_dtype)
    return BodyServer.from_split(split, cfg.train, cfg.split.server_adapters)


def eval_state(split: SplitModel, body: BodyServer, client_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole adapter to evaluate: the global client side plus the in-process body's adapters
    (the shared set or the mean of the per-client sets; their initial values before any training)."""
    return {**client_state, **(body.mean_adapter_state() or split.server_state())}


@dataclass
class SplitRound:
    """One client's split round: the new client-side adapter state and its metrics."""

    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


def train_split_round(cfg: Config, split: SplitModel, service: BodyService, client_id: str, dataset: Dataset,
                      collate: object, global_state: dict[str, torch.Tensor], seed: int,
                      device: str | torch.device = "cpu") -> SplitRound:
    """Load the global client-side adapter, train one round through ``service``, return the new state.

    ``global_state`` may be the whole monolithic adapter state: only the front/back keys are used.
    Metrics: ``train_loss``, ``split_bytes_up`` / ``split_bytes_down`` (activation + gradient frames),
    ``split_steps``, ``split_local_steps``, ``split_kept_examples``, ``split_client_adapter_bytes`` (fp32
    client-side adapter: what SplitFed aggregates) and ``fl_adapter_bytes_fp32`` (fp32 size of the whole
    adapter: what plain adapter FL would send for the same round).
    """
    client_keys = split.client_parameters().keys()
    missing = client_keys - global_state.keys()
    if missing:
        raise SplitError(f"the global client-side adapter lacks {sorted(missing)[:3]}")
    split.set_client_state({k: global_state[k] for k in client_keys})
    client = SplitClient(split, service, client_id, cfg.train, split_options(cfg), device, seed)
    result = client.train(dataset, collate, seed)  # type: ignore[arg-type]
    state = split.client_state()
    whole = split.adapter_numel  # counted at the cut: a client with a remote body no longer holds the body
    metrics = {"train_loss": result.loss, "split_local_loss": result.local_loss,
               "split_bytes_up": float(result.bytes_sent), "split_bytes_down": float(result.bytes_received),
               "split_steps": float(result.steps), "split_local_steps": float(result.local_steps),
               "split_kept_examples": float(result.kept_examples),
               "split_client_adapter_bytes": float(4 * sum(t.numel() for t in state.values())),
               "fl_adapter_bytes_fp32": float(4 * whole), "split_seconds": result.seconds}
    log.info("split round of %s: loss %.4f, %d steps, %d B up / %d B down through the body", client_id,
             result.loss, result.steps, result.bytes_sent, result.bytes_received)
    return SplitRound(state=state, num_examples=result.num_examples, metrics=metrics)
