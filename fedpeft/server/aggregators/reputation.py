"""Per-group outlier scores and a cross-round client reputation, the backdoor defence of ``cosine_filter``.

A backdoor's update under a sparse ternary uplink (``compeft``) is of ordinary size and, over the whole
adapter, agrees with the honest direction as much as an honest update does: a whole-vector test cannot
tell them apart. On updates captured from one ``compeft:0.1`` run (MiniLM + LoRA, BBC News, seed 0) a small
group, the classification head, singled an attacker out in a round where the whole update did not. Two
pieces act on that lead:

- **Per-group scores** (``federation.score_groups``): the leave-one-out cosine of each update with the
  sum of the others is computed per group of tensors (``kind``: the LoRA factors together, the other
  tensors together; ``module``: each LoRA module's A and B together, each other module; ``whole``: one
  group, the plain rule). An update is an outlier when, in *any* group, its cosine is below
  ``federation.min_cosine`` or more than ``federation.outlier_z`` robust deviations (1.4826 x the median
  absolute deviation) below that group's median cosine. A relative test is needed because sparse ternary
  updates overlap little: their cosines sit near 0.1-0.3, so no absolute threshold separates them.
- **Reputation** (``federation.reputation_decay``): each client (node id) starts at 1; an update left out
  in a round multiplies its client's reputation by the decay, and a client's update counts in later rounds
  with its reputation as its weight. Attackers that look honest in the first round keep a reduced weight
  after they are caught once. It never recovers: a slow attacker cannot earn its weight back by sending
  honest updates for a while. The reputations are aggregator state and persist in the checkpoint.

Measured over 3 seeds (docs/robust-aggregation.md) this does not stop that backdoor: the per-group cosines of
sparse ternary updates spread as much between honest clients as between honest and hostile ones, and a client
left out wrongly loses weight for the rest of the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft import lazy
from fedpeft.server.aggregators.robust import median

if TYPE_CHECKING:
    import torch

    from fedpeft.models import AdapterState
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

MAD_TO_STD = 1.4826  # a normal distribution's standard deviation per median absolute deviation
MIN_DEVIATION = 1e-6  # below this a cosine's distance from the median is rounding, never an outlier
PREFIX = "reputation/"


def group_of(key: str, mode: str) -> str:
    """The score group of an adapter tensor: ``whole`` -> one group; ``kind`` -> ``lora`` or ``other``;
    ``module`` -> the module's name (a LoRA pair's A and B share it)."""
    lora = ".lora_A." in key or ".lora_B." in key
    if mode == "whole":
        return "whole"
    if mode == "kind":
        return "lora" if lora else "other"
    return key.split(".lora_", 1)[0] if lora else key.rsplit(".", 1)[0]


def group_grams(deltas: list[AdapterState], mode: str) -> dict[str, torch.Tensor]:
    """(n, n) float64 Gram matrix of the updates per score group (their sum is the whole Gram matrix)."""
    grams: dict[str, torch.Tensor] = {}
    for key in deltas[0]:
        x = torch.stack([d[key].reshape(-1) for d in deltas]).double()
        name = group_of(key, mode)
        grams[name] = grams[name] + x @ x.T if name in grams else x @ x.T
    return grams


def low_outliers(values: torch.Tensor, z: float) -> torch.Tensor:
    """Mask of the values more than ``z`` robust deviations (1.4826 x MAD) below the median; none when z <= 0
    or fewer than 3 values."""
    if z <= 0 or values.numel() < 3:
        return torch.zeros_like(values, dtype=torch.bool)
    med = float(median(values))
    mad = float(median((values - med).abs()))
    return values < med - max(z * MAD_TO_STD * mad, MIN_DEVIATION)


def reputations(state: dict[str, torch.Tensor], nodes: list[int]) -> torch.Tensor:
    """The stored reputation of each node (1 for a node not seen before), as float64."""
    return torch.tensor([float(state[f"{PREFIX}{n}"]) if f"{PREFIX}{n}" in state else 1.0 for n in nodes],
                        dtype=torch.float64)


def penalise(state: dict[str, torch.Tensor], nodes: list[int], rep: torch.Tensor, flagged: list[int],
             decay: float) -> None:
    """Store the reputations after this round: ``rep`` times ``decay`` for the flagged entries (new tensors, so a
    clone of the state taken before the round is untouched)."""
    for i, node in enumerate(nodes):
        value = float(rep[i]) * (decay if i in flagged else 1.0)
        if f"{PREFIX}{node}" in state or value != 1.0:
            state[f"{PREFIX}{node}"] = torch.tensor([value], dtype=torch.float64)
