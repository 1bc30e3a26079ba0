"""``sign_span``: the span attack on the update of an adaptive optimiser (Adam, AdamW), several local steps.

Adam divides each coordinate's running mean gradient by its running RMS. On one batch over a few steps
the gradient keeps its sign and changes little in size (later round), or grows by a common factor (first
round: B leaves 0 after the first step, dL/dA = Bᵀ·δ·xᵀ grows with B), and Adam's ratio is then the same
for every coordinate: the update is −lr·c·sign(g). A dL/dA row is g_i = X u_i (X: the batch's first-block
inputs), so the update's rows keep exactly one bit per coordinate of a vector in span(X): the span
test's exact residuals are gone (every candidate is far from the span of sign vectors), the ranking of
``span`` / ``subspace_opt`` only half survives.

Here the bits are modelled as such (1-bit compressed sensing over the candidate inputs): greedy
*logistic pursuit*. A set of chosen inputs X_S explains the sign rows when, for every row i, a linear
combination X_S u_i has the observed signs; each row's u_i is a logistic regression without intercept
(a few Newton steps, warm-started). At each step the ``width`` candidates whose inputs correlate most with
the rows' logistic residuals are each tried, and the one that lowers the summed logistic loss most is
kept. It stops at the public token bound, when every position holds ``batch_size`` tokens (learned
positions), or when the chosen inputs reproduce all but a fraction ``floor`` of the signs.
Dropout (a different mask each step) flips some signs; the fit then stops on the bound, not the floor.

The magnitudes can say more (``fit="magnitude"``): a coordinate whose gradient changed sign or shrank
during the steps (a later round: both LoRA factors move) gets a smaller update than the saturated ±lr·c of
the others, i.e. its margin (X u_i)_j is near zero. Each row is then fitted by least squares to soft signs
y = clip(update / its row's 90th-percentile magnitude, ±1) · 0.8 through y ≈ tanh(X u_i) (damped
Gauss-Newton), which reads both the signs and the near-zero margins. ``fit="auto"`` (the default) takes
the magnitudes where at least 5 % of the coordinates are clearly unsaturated (:func:`unsaturated`; a first
round, where dL/dA only grows by a common factor, is pure signs and fits worse by magnitude).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from fedpeft.attacks.lora_io import by_rows
from fedpeft.attacks.observation import AttackResult, NotApplicable, Observation, register_attack
from fedpeft.attacks.span import first_layer, update_pairs

log = logging.getLogger(__name__)


def update_rows(obs: Observation, group: list, d: int, rounds: str = "all") -> torch.Tensor:
    """The stacked first-block dL/dA-shaped update rows (float64), all-zero rows dropped."""
    rows = torch.cat([upd[m.a_name].to(torch.float64).reshape(-1, d) for _, upd in update_pairs(obs, rounds)
                      for m in group])
    return rows[rows.abs().amax(-1) > 0]


def unsaturated(targets: torch.Tensor, level: float = 0.8, share: float = 0.05, below: float = 0.8) -> bool:
    """Whether at least ``share`` of the soft signs are below ``below`` of the saturated ``level``: the
    magnitudes then carry margins (measured on a tiny LLaMA: 0.45-0.62 of the level in later rounds,
    0.95-0.98 in first rounds)."""
    return float(torch.quantile(targets.abs().flatten(), share)) < below * level


def soft_signs(rows: torch.Tensor, level: float = 0.8, quantile: float = 0.9) -> torch.Tensor:
    """Each row divided by its ``quantile`` magnitude, clipped to ±1, times ``level`` (< 1: a saturated
    coordinate is a finite tanh margin, not an infinite one)."""
    scale = torch.quantile(rows.abs(), quantile, dim=-1, keepdim=True).clamp_min(1e-300)
    return (rows / scale).clamp(-1.0, 1.0) * level


def soft_sign_fit(x: torch.Tensor, y: torch.Tensor, start: torch.Tensor | None = None, iters: int = 15,
                  lam: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per row i, u_i minimising Σ_j (y_ij − tanh((X u_i)_j))² + lam/2 ‖u_i‖² by Levenberg-Marquardt
    (Gauss-Newton with a per-row damping that shrinks after a step that lowers the loss and grows otherwise).
    Arguments and returns as :func:`logistic_fit` (``y``: soft signs in (−1, 1))."""
    k = x.shape[0]
    u = torch.zeros(y.shape[0], k, dtype=torch.float64)
    if start is not None:
        u[:, :start.shape[1]] = start
    eye = torch.eye(k, dtype=torch.float64)

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        return ((y - torch.tanh(v @ x)) ** 2).sum(-1) + 0.5 * lam * (v ** 2).sum(-1)

    cur, damp = loss_of(u), torch.ones(y.shape[0], dtype=torch.float64)
    for _ in range(iters):
        t = torch.tanh(u @ x)
        slope = 1 - t * t
        grad = -((y - t) * slope) @ x.T + lam * u
        jtj = torch.einsum("rd,kd,ld->rkl", slope * slope, x, x) + (lam + damp[:, None, None]) * eye
        trial = u - torch.linalg.solve(jtj, grad.unsqueeze(-1)).squeeze(-1)
        new = loss_of(trial)
        better = new < cur
        u, cur = torch.where(better[:, None], trial, u), torch.where(better, new, cur)
        damp = torch.where(better, damp * 0.3, damp * 4.0)
    return u @ x, u, float(cur.sum())


def logistic_fit(x: torch.Tensor, signs: torch.Tensor, start: torch.Tensor | None = None, iters: int = 15,
                 lam: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per row i, u_i minimising Σ_j softplus(−s_ij (X u_i)_j) + lam/2 ‖u_i‖² by Newton's method.

    ``x``: chosen inputs (k × d, unit rows), ``signs``: (rows × d), ``start``: the previous fit's u for the
    first k − 1 inputs. Returns the margins X u (rows × d), u (rows × k) and the total loss."""
    k = x.shape[0]
    u = torch.zeros(signs.shape[0], k, dtype=torch.float64)
    if start is not None:
        u[:, :start.shape[1]] = start
    eye = lam * torch.eye(k, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(-signs * (u @ x))
        grad = -(signs * p) @ x.T + lam * u
        hess = torch.einsum("rd,kd,ld->rkl", p * (1 - p), x, x) + eye
        u = u - torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
    margins = u @ x
    return margins, u, float(F.softplus(-signs * margins).sum() + 0.5 * lam * (u ** 2).sum())


def _correlation(resid: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_r (resid_r · x)² for each candidate row x of ``c`` (float64)."""
    return ((c.to(torch.float64) @ resid.T) ** 2).sum(-1)


def pursuit(targets: torch.Tensor, cands: torch.Tensor, per_position: int, max_picks: int, width: int = 24,
            floor: float = 0.01, fit: str = "sign") -> tuple[list[tuple[int, int]], list[float], torch.Tensor]:
    """Greedy pursuit over candidate inputs (positions × vocab × d): the chosen (position, token) pairs in
    order, the fraction of signs unexplained after each pick, and the first step's correlation score of
    every candidate (positions × vocab, the ranking of the tokens never picked). ``fit="sign"``: logistic
    fits to the signs of ``targets``; ``"magnitude"``: :func:`soft_sign_fit` to ``targets`` (soft signs)."""
    if fit not in ("sign", "magnitude"):
        raise ValueError(f"sign_span fit must be 'sign' or 'magnitude', got {fit!r}")
    signs = torch.sign(targets)
    n_pos, vocab, d = cands.shape
    flat = cands.reshape(-1, d)  # rows go to float64 a chunk (or a pick) at a time: the table is gigabytes
    norms = by_rows(lambda c: c.to(torch.float64).norm(dim=-1), flat)
    usable = norms > 1e-12 * float(norms.max())  # zero inputs (a padding embedding) explain nothing
    norms = norms.clamp_min(1e-12 * float(norms.max()))
    picks: list[int] = []
    errors: list[float] = []
    taken = torch.zeros(n_pos, dtype=torch.long)
    u, resid, first = None, signs, None
    while len(picks) < max_picks:
        score = by_rows(partial(_correlation, resid), flat) / norms ** 2
        score[~usable] = 0.0
        if first is None:
            first = score.clone()
        score[~usable] = -1.0
        score[picks] = -1.0
        score[(taken >= per_position).repeat_interleave(vocab)] = -1.0
        tries = [int(i) for i in torch.topk(score, min(width, score.numel())).indices if float(score[i]) >= 0]
        if not tries:
            break
        best = None
        for i in tries:
            x = flat[picks + [i]].to(torch.float64) / norms[picks + [i], None]
            margins, u_new, loss = logistic_fit(x, signs, u) if fit == "sign" else soft_sign_fit(x, targets, u)
            if best is None or loss < best[0]:
                best = (loss, i, margins, u_new)
        assert best is not None
        _, i, margins, u = best
        picks.append(i)
        taken[i // vocab] += 1
        if fit == "sign":
            resid = signs * torch.sigmoid(-signs * margins)
        else:
            t = torch.tanh(margins)
            resid = (targets - t) * (1 - t * t)
        errors.append(float((torch.sign(margins) != signs).double().mean()))
        if errors[-1] <= floor:
            break
    assert first is not None
    return [divmod(i, vocab) for i in picks], errors, first.reshape(n_pos, vocab)


@register_attack("sign_span")
def run(obs: Observation, width: int = 24, floor: float = 0.01, rounds: str = "all", max_picks: int = 64,
        fit: str = "auto", **_: Any) -> AttackResult:
    """Pursuit on the first-block dL/dA-shaped update (:func:`pursuit`): its soft signs (``fit="magnitude"``),
    its signs alone (``fit="sign"``, the logistic pursuit: the attack as first measured), or ``"auto"``: the
    magnitudes where they vary (:func:`unsaturated`), else the signs.

    ``width``: candidates tried per pick; ``floor``: the fraction of unexplained signs at which it stops;
    ``max_picks``: at most this many picks besides the token bound (each pick fits ``width`` regressions
    with one more input: the cost grows with the square of the picks).
    A learned-position model's single example comes back as a sequence (its picks in position order).
    (Adding the deeper layers' rows with approximate inputs, as ``span`` can, lowered the bag F1 on a tiny
    LLaMA from 0.82 to 0.56: their signs are not explained by context-free inputs.)
    Not applicable to a client whose public optimizer is not Adam-family (``obs.optimizer``)."""
    if not obs.optimizer.lower().startswith("adam"):
        raise NotApplicable(f"sign_span reads the update of an Adam(W) client; optimizer {obs.optimizer!r}: "
                            "a plain SGD update keeps its magnitudes, which span reads exactly")
    group, cands, positional = first_layer(obs)
    rows = update_rows(obs, group, cands.shape[-1], rounds)
    if rows.shape[0] == 0:
        return AttackResult("sign_span", token_scores=torch.zeros(cands.shape[1]), extra={"picks": []})
    per_position = obs.batch_size if positional else obs.token_bound
    if fit not in ("auto", "sign", "magnitude"):
        raise ValueError(f"sign_span fit must be 'auto', 'sign' or 'magnitude', got {fit!r}")
    soft = soft_signs(rows)
    if fit == "auto":
        fit = "magnitude" if unsaturated(soft) else "sign"
    targets = soft if fit == "magnitude" else torch.sign(rows)
    picks, errors, first = pursuit(targets, cands, per_position, min(obs.token_bound, max_picks), width, floor,
                                   fit)
    scores = first / first.max().clamp_min(1e-300)  # in [0, 1]; the picks above, in pick order
    for rank, (p, v) in enumerate(picks):
        scores[p, v] = 2.0 + (len(picks) - rank) / max(len(picks), 1)
    token_scores = scores.max(0).values.float()
    bag = sorted({v for _, v in picks})
    sequences = [[v for _, v in sorted(picks)]] if positional and obs.batch_size == 1 else []
    log.info("sign_span[%s]: %d rows, %d picks, unexplained %.3f", fit, rows.shape[0], len(picks),
             errors[-1] if errors else 1.0)
    return AttackResult("sign_span", token_scores=token_scores, position_scores=scores.float() if positional else None,
                        bag=bag, sequences=sequences,
                        extra={"picks": picks, "unexplained": errors, "rows": rows.shape[0], "fit": fit,
                               "positions": picks if positional else [], "modules": [m.path for m in group]})
