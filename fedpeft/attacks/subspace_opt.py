"""``subspace_opt``: a ranking that survives noise, compression and Adam, where the exact span test
returns nothing.

Continuous relaxations of "x_v lies in the row space of the stacked first-block dL/dA" (M), scored
for every vocabulary token (and position for learned-position models); ``method``:

* ``wiener`` (default): projection of the centred candidate input onto M's right singular vectors
  with Wiener weights 1 − τ²/s², τ the noise edge estimated from M's smallest singular values, and at
  most the public token-count bound of directions. Without noise it is the span test's subspace.
* ``projection``: unweighted top-k subspace cosine (k = the token-count bound).
* ``energy``: ||M x̂||² / ||M||²_F (weights directions by s², favours the dominant tokens).
* ``sparse``: explain the top-k directions as non-negative, ℓ1-sparse combinations of candidate
  inputs (ISTA); a candidate's score is the mass it receives.

Measured on the tiny models the plain subspace ranking (wiener / projection, or ``span``'s residual
ranking) is the strongest of these; ``energy`` and ``sparse`` are kept for comparison.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedpeft.attacks.lora_io import by_rows, row_mean
from fedpeft.attacks.observation import AttackResult, Observation, register_attack
from fedpeft.attacks.span import first_layer

log = logging.getLogger(__name__)


def update_rows(obs: Observation, group: list, d: int) -> torch.Tensor:
    """The stacked first-block lora_A rows of every round (float64, unit Frobenius norm)."""
    blocks = []
    for _, upd in obs.updates():
        for m in group:
            blocks.append(upd[m.a_name].to(torch.float64).reshape(-1, d))
    rows = torch.cat(blocks)
    return rows / rows.norm().clamp_min(1e-300)


def energy_scores(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """||rows · x̂||² / ||rows||²_F for centred, unit-norm candidate inputs (positions × vocab)."""
    mean, total = row_mean(cands), (rows ** 2).sum().clamp_min(1e-300)

    def score(c: torch.Tensor) -> torch.Tensor:
        x = c.to(torch.float64) - mean
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        return ((x @ rows.T) ** 2).sum(-1) / total
    return by_rows(score, cands)


def weighted_cosines(cands: torch.Tensor, vh: torch.Tensor, w: torch.Tensor, centre: bool) -> torch.Tensor:
    """Σ_i w_i (v_i · x)² / ||x||² for every candidate input x (centred on the table's mean if ``centre``),
    one chunk of rows at a time in float64 (the table is positions × vocab × d: gigabytes as float64)."""
    mean = row_mean(cands) if centre else None

    def score(c: torch.Tensor) -> torch.Tensor:
        x = c.to(torch.float64) if mean is None else c.to(torch.float64) - mean
        return (((x @ vh.T) ** 2) * w).sum(-1) / (x ** 2).sum(-1).clamp_min(1e-300)
    return by_rows(score, cands)


def projection_scores(rows: torch.Tensor, cands: torch.Tensor, k: int, centre: bool = True) -> torch.Tensor:
    """||V_k x̂||² / ||x̂||²: the squared cosine between a (centred) candidate and the top-k subspace."""
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    vk = vh[: max(1, min(k, vh.shape[0]))]
    return weighted_cosines(cands, vk, vk.new_ones(vk.shape[0]), centre)


def wiener_scores(rows: torch.Tensor, cands: torch.Tensor, bound: int) -> torch.Tensor:
    """Projection with Wiener weights 1 − τ²/s_i² on the top directions, where τ is the singular-value
    edge of the noise estimated from the smallest singular values (rows ≤ d: they are noise-only when
    the client has fewer distinct inputs than rows). Without noise this is the span test's subspace."""
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    n, d = rows.shape
    sigma = float(s[-1]) / max(d ** 0.5 - n ** 0.5, 1.0)
    tau = sigma * (d ** 0.5 + n ** 0.5)
    w = torch.clamp(1 - tau ** 2 / s.clamp_min(1e-300) ** 2, min=0.0)
    w[min(bound, n):] = 0.0
    if float(w.sum()) == 0.0:
        w[0] = 1.0
    return weighted_cosines(cands, vh, w, centre=True)


SPARSE_POOL = 4096  # candidates the sparse codes are fitted over (the nearest to the subspace)


def sparse_scores(rows: torch.Tensor, cands: torch.Tensor, k: int, lam: float, iters: int) -> torch.Tensor:
    """Singular-value-weighted non-negative sparse codes of the top-k directions over the candidates.

    The codes are fitted over the :data:`SPARSE_POOL` candidates with the largest squared cosine to the top-k
    subspace (all of them in a small table); the others score 0. Over a whole real table (two million
    positions × tokens) the codes alone would take gigabytes, and a candidate far from the subspace gets no
    mass under the non-negative ℓ1 penalty anyway."""
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    k = max(1, min(k, vh.shape[0]))
    near = weighted_cosines(cands, vh[:k], vh.new_ones(k), centre=False).flatten()
    pool = torch.topk(near, min(SPARSE_POOL, near.numel())).indices
    x = cands.reshape(-1, cands.shape[-1])[pool].to(torch.float64)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    target = vh[:k] * s[:k, None] / s[0]  # k × d, signs of singular vectors are arbitrary: fit ±
    target = torch.cat([target, -target])
    w = torch.zeros(target.shape[0], x.shape[0], dtype=torch.float64)
    step = 1.0 / float(torch.linalg.matrix_norm(x, 2) ** 2)
    for _ in range(iters):  # ISTA with non-negativity: min ||W X − T||² / 2 + lam ||W||_1
        grad = (w @ x - target) @ x.T
        w = torch.clamp(w - step * (grad + lam), min=0.0)
    out = torch.zeros(near.numel(), dtype=torch.float64)
    out[pool] = w.sum(0)
    return out.reshape(cands.shape[:-1])


@register_attack("subspace_opt")
def run(obs: Observation, method: str = "wiener", k: int | None = None, lam: float = 0.01, iters: int = 200,
        top: int | None = None, **_: Any) -> AttackResult:
    """Rank every vocabulary token; ``bag`` = the ``top`` best (default: the public token-count bound
    capped at 10% of the vocabulary)."""
    group, cands, positional = first_layer(obs)
    rows = update_rows(obs, group, cands.shape[-1])
    if float(rows.abs().max()) == 0.0:
        scores = torch.zeros(cands.shape[:-1], dtype=torch.float64)
    elif method == "wiener":
        scores = wiener_scores(rows, cands, k or obs.token_bound)
    elif method in ("projection", "projection_raw"):
        scores = projection_scores(rows, cands, k or min(obs.token_bound, rows.shape[0]), method == "projection")
    elif method == "energy":
        scores = energy_scores(rows, cands)
    else:
        kk = k or min(obs.token_bound, rows.shape[0])
        scores = sparse_scores(rows, cands, kk, lam, iters) + 1e-6 * energy_scores(rows, cands)  # tie-break
    token_scores = scores.max(dim=0).values.float()
    vocab = token_scores.numel()
    top = top or max(1, min(obs.token_bound, vocab // 10))
    bag = torch.topk(token_scores, top).indices.tolist()
    return AttackResult("subspace_opt", token_scores=token_scores,
                        position_scores=scores.float() if positional else None, bag=sorted(bag),
                        extra={"method": method, "modules": [m.path for m in group]})
