"""SCAFFOLD (Karimireddy et al. 2020) control variates, Flower-free (``federation.strategy = "scaffold"``).

The server keeps a control variate ``c`` and each client its own ``c_i`` (one tensor per adapter tensor, zero at
the start). Every local step a client corrects its gradient by ``c - c_i``; after ``K`` steps at learning rate
``lr`` from the global adapter ``x`` to ``y_i`` it updates (the paper's option II)

    c_i+ = c_i - c + (x - y_i) / (K lr),      Δc_i = c_i+ - c_i = -c - Δy_i / (K lr)

and sends ``Δc_i`` beside its adapter delta ``Δy_i`` **in the same payload**: the uplink layout is the adapter's
plus a ``scaffold/<name>`` copy of every tensor (:func:`uplink_layout`), so the control variate goes through the
same codec, error feedback and byte accounting as the update (twice the uplink elements). The server steps
``x += server_lr · mean(Δy_i)`` (example-weighted, as FedAvg) and ``c += (1 / N) Σ Δc_i`` over the replies (``N``:
``data.num_clients``), and sends ``c`` to every sampled client as a dense fp32 record (``scaffold-control``).
The option-II estimate assumes ``K`` plain SGD steps at one learning rate, so the configuration requires
``train.optimizer = "sgd"`` with a constant schedule (under Adam, ``(x - y_i) / (K lr)`` is about the sign of
the update, not a gradient, and swamps the real gradients).
"""

from __future__ import annotations

import torch

from fedpeft.compression import Layout
from fedpeft.models import AdapterState

PREFIX = "scaffold/"


def uplink_layout(adapter: Layout) -> Layout:
    """The adapter's layout plus one control-variate tensor per adapter tensor."""
    shapes = dict(zip(adapter.names, adapter.shapes))
    return Layout.from_state({**{n: torch.empty(s) for n, s in shapes.items()},
                              **{PREFIX + n: torch.empty(s) for n, s in shapes.items()}})


def control_delta(c: AdapterState, delta: AdapterState, steps: int, lr: float) -> AdapterState:
    """``Δc_i = -c - Δy_i / (K lr)`` (option II; ``delta`` = ``y_i - x``)."""
    return {k: -c[k] - delta[k] / (max(steps, 1) * lr) for k in c}


def split(delta: AdapterState) -> tuple[AdapterState, AdapterState]:
    """A decoded uplink -> (adapter delta, control-variate delta)."""
    update = {k: v for k, v in delta.items() if not k.startswith(PREFIX)}
    control = {k[len(PREFIX):]: v for k, v in delta.items() if k.startswith(PREFIX)}
    return update, control


def join(update: AdapterState, control: AdapterState) -> AdapterState:
    """Inverse of :func:`split`: what a client encodes."""
    return {**update, **{PREFIX + k: v for k, v in control.items()}}
