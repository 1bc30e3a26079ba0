"""SCAFFOLD (Karimireddy et al. 2020) control variates, Flower-free (``federation.strategy = "scaffold"``).

The server keeps a control variate ``c`` and each client its own ``c_i`` (one tensor per adapter tensor, zero at
the start). Every local step a client corrects its gradient by ``c - c_i``; after ``K`` steps at learning rate
``lr`` from the global adapter ``x`` to ``y_i`` it updates (the paper's option II)

    c_i+ = c_i - c + (x - y_i) / (K lr),      Δc_i = c_i+ - c_i = -c - Δy_i / (K lr)

Option II's ``Δc_i`` is a function of the update, ``c``, ``K`` and ``lr`` alone, so it does not travel: the client
applies it to ``c_i`` computed from the update **as sent** (decoded from its own payload, after compression and
error feedback) and the server computes the same from the update as it decoded it (``K`` from the reply's
``num-examples``). Both sides hold the same numbers whatever the codec, ``c`` stays the mean
of the ``c_i`` over the population, the uplink carries the update alone, and no client can steer ``c`` other
than through its own update. The server steps ``x += server_lr · mean(Δy_i)`` (example-weighted, as FedAvg)
and ``c += (1 / N) Σ Δc_i`` over the replies (``N``: ``data.num_clients``), and sends ``c`` to every sampled
client as a dense fp32 record (``scaffold-control``). The option-II estimate assumes ``K`` plain SGD steps at
one learning rate, so the configuration requires ``train.optimizer = "sgd"`` with a constant schedule (under
Adam, ``(x - y_i) / (K lr)`` is about the sign of the update, not a gradient, and swamps the real gradients).
"""

from __future__ import annotations

from fedpeft.models import AdapterState


def control_delta(c: AdapterState, delta: AdapterState, steps: int, lr: float) -> AdapterState:
    """``Δc_i = -c - Δy_i / (K lr)`` (option II; ``delta`` = ``y_i - x`` as sent)."""
    return {k: -c[k] - delta[k] / (max(steps, 1) * lr) for k in c}
