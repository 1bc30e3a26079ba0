"""``smashed``: invert the activations a split-learning client sends ("smashed data") back to tokens.

Threat model: an honest-but-curious split server. Per step it receives ``{"hidden", "attention_mask"}``
(the output of the client's front: embeddings + the first ``front_layers`` blocks, plus optional
Gaussian ``activation_noise``) and later ``{"grad"}``. It knows the architecture, the frozen base
weights and the client-side adapter of the round (initial, or the aggregated SplitFed one), so it can
rebuild the front itself (:func:`fedpeft.split.cut.cut_model`). A :class:`SplitObservation` holds
exactly that; the client's token ids reach only :mod:`fedpeft.attacks.metrics`.

Methods (``method="auto"`` picks the first that applies):

* ``nearest`` (``front_layers = 0``): the activations are the embedding layer's output at each
  position (token + position embedding, + LayerNorm for BERT; soft-prompt positions skipped), so
  each position is decoded independently by maximum likelihood over the whole vocabulary: Gaussian
  noise gives nearest neighbour in L2; if the client's front ran with dropout (training), each
  coordinate is a mixture "dropped (0) or kept (x / (1 − p))". Exact without noise.
* ``causal`` (causal models, ``front_layers >= 1``): position t of a causal front depends only on
  tokens <= t, so a left-to-right search tries every vocabulary token at t after the recovered
  prefix and keeps the best match (``beam`` prefixes). Without noise or dropout the true token
  matches to rounding error, so the search is exact and the residual certifies it.
* ``coordinate`` (bidirectional fronts, BERT ``front_layers >= 1``): start from the nearest-embedding
  decode (or the soft optimisation), then sweep the positions, trying ``topk`` candidates at each
  with the others fixed and keeping the one that best matches *all* positions; stop when a sweep
  changes nothing. Exact when it reaches zero residual (reported), a local search otherwise.
* ``optimize``: soft token distributions (softmax over the vocabulary, mixed word embeddings) run
  through the server's front, Adam on L2 + cosine distance to the observation, projected by argmax.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.attacks.observation import AttackResult, NotApplicable, State, register_attack
from fedpeft.split.cut import FrontPart, SplitModel

log = logging.getLogger(__name__)


@dataclass
class SplitObservation:
    """What the split server sees of one client step, and what it can rebuild.

    ``split``: the server's own cut of the model (architecture + frozen weights; its adapter values
    are replaced by ``client_state`` when given). ``hidden`` [B, T', H] and ``attention_mask`` [B, T']
    are the forward message as received (T' includes soft-prompt positions), ``grad`` the backward
    message (kept for completeness; unused). ``activation_noise`` is the public noise std of the run
    (0 = none/unknown); ``train_mode`` says the client's front ran with dropout on (training steps).
    """

    split: SplitModel
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    client_state: State | None = None
    grad: torch.Tensor | None = None
    activation_noise: float = 0.0
    train_mode: bool = True
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, split: SplitModel, forward: dict[str, torch.Tensor],
                  backward: dict[str, torch.Tensor] | None = None, **kw: Any) -> SplitObservation:
        """The observation of one step from the wire messages (``forward``: hidden + mask, ``backward``: grad)."""
        if set(forward) != {"hidden", "attention_mask"}:
            raise ValueError(f"a split forward message carries hidden + attention_mask, got {sorted(forward)}")
        return cls(split=split, hidden=forward["hidden"], attention_mask=forward["attention_mask"],
                   grad=None if backward is None else backward.get("grad"), **kw)

    def front(self, dtype: torch.dtype = torch.float64) -> FrontPart:
        """A private copy of the front in ``dtype`` with the known client adapter loaded (cached, eval mode)."""
        key = f"front:{dtype}"
        if key not in self._cache:
            split = copy.deepcopy(self.split)  # one deepcopy: the parts keep sharing the model's modules
            if self.client_state is not None:
                split.set_client_state(self.client_state)
            split.peft_model.to(dtype)
            split.peft_model.eval()  # not just front.eval(): GPT-2's embedding dropout is not a front submodule
            self._cache[key] = split.front
        return self._cache[key]


# ---------------------------------------------------------------------- running the server's front

def _ids_forward(front: FrontPart, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return front(ids, mask)[0]


def _embeds_forward(front: FrontPart, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The front on input embeddings (as :meth:`FrontPart.forward` does on ids), differentiable."""
    stack = front._stack
    if front.num_virtual_tokens:
        prompts = front.soft_prompt(embeds.shape[0]).to(embeds.dtype)
        embeds = torch.cat((prompts, embeds), dim=1)
        mask = torch.cat((torch.ones(mask.shape[0], front.num_virtual_tokens, dtype=mask.dtype), mask), dim=1)
    hidden = stack.embed(None, embeds)
    if len(front.layers):
        hidden = stack.run(front.layers, hidden, stack.context(hidden, mask))
    return hidden


def embedding_table(front: FrontPart, position: int) -> torch.Tensor:
    """[V, H]: what the embedding layer outputs for every vocabulary token at absolute ``position``."""
    stack, enc = front._stack, front._stack.encoder
    weight = front.embeddings.weight
    with torch.no_grad():
        if stack.kind == "bert":
            pos = torch.full((weight.shape[0], 1), position, dtype=torch.long)
            return enc.embeddings(inputs_embeds=weight[:, None], position_ids=pos)[:, 0]
        if stack.kind == "gpt2":
            return weight + enc.wpe.weight[position]
        return weight.clone()


def embedding_dropout(front: FrontPart) -> float:
    """The dropout probability applied to the embedding output in training (public: the model config)."""
    cfg, kind = front._stack.config, front._stack.kind
    if kind == "bert":
        return float(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
    if kind == "gpt2":
        return float(getattr(cfg, "embd_pdrop", 0.0) or 0.0)
    return 0.0


def is_causal(front: FrontPart) -> bool:
    return front._stack.kind in ("gpt2", "llama") or bool(getattr(front._stack.config, "is_decoder", False))


# ---------------------------------------------------------------------- scores

def _nll(obs: torch.Tensor, cand: torch.Tensor, sigma: float, dropout: float) -> torch.Tensor:
    """Negative log-likelihood (up to a constant) of ``obs`` [H] given each candidate row [N, H]:
    Gaussian noise of std ``sigma``, each coordinate dropped with probability ``dropout``."""
    if dropout <= 0:
        return ((cand - obs) ** 2).sum(-1) / (2 * sigma ** 2)
    kept = math.log1p(-dropout) - (obs - cand / (1 - dropout)) ** 2 / (2 * sigma ** 2)
    dropped = math.log(dropout) - obs ** 2 / (2 * sigma ** 2)
    return -torch.logaddexp(kept, dropped.expand_as(kept)).sum(-1)


def _dist(out: torch.Tensor, obs: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of candidate outputs [..., H] to ``obs`` [H] (summed over leading non-batch dims by caller)."""
    diff = out - obs
    return diff.abs().sum(-1) if metric == "l1" else (diff ** 2).sum(-1)


# ---------------------------------------------------------------------- methods

def decode_nearest(front: FrontPart, hidden: torch.Tensor, sigma: float, dropout: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``front_layers = 0``: per-position maximum-likelihood token over the vocabulary.
    Returns the ids [B, T] and the posteriors [B, T, V]."""
    nv = front.num_virtual_tokens
    batch, total, _ = hidden.shape
    ids, post = [], []
    for t in range(nv, total):
        table = embedding_table(front, t)
        nll = torch.stack([_nll(hidden[b, t], table, sigma, dropout) for b in range(batch)])
        ids.append(nll.argmin(-1))
        post.append(torch.softmax(-nll, -1))
    return torch.stack(ids, 1), torch.stack(post, 1)


def _chunks(n: int, length: int, budget: int = 1 << 16) -> list[slice]:
    step = max(1, budget // max(1, length))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def decode_causal(front: FrontPart, hidden: torch.Tensor, mask: torch.Tensor, metric: str = "l2",
                  beam: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-to-right search: at each position try every vocabulary token after the kept prefixes."""
    nv, vocab = front.num_virtual_tokens, front.embeddings.weight.shape[0]
    tokens = hidden.shape[1] - nv
    rows, scores = [], torch.zeros(hidden.shape[0], tokens, vocab, dtype=torch.float64)
    for b in range(hidden.shape[0]):
        hyps: list[tuple[float, list[int]]] = [(0.0, [])]
        for t in range(tokens):
            m = mask[b, nv:nv + t + 1]
            merged = []
            for h_i, (acc, prefix) in enumerate(hyps):
                cand = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(vocab, t),
                                  torch.arange(vocab)[:, None]], 1)
                d = torch.cat([_dist(_ids_forward(front, cand[s], m.expand(s.stop - s.start, -1))[:, nv + t],
                                     hidden[b, nv + t], metric) for s in _chunks(vocab, t + 1 + nv)])
                if h_i == 0:
                    scores[b, t] = -d.double()
                merged.append(acc + d.double())
            total = torch.stack(merged)  # [hyps, V]
            best = torch.topk(-total.flatten(), min(beam, total.numel())).indices
            hyps = [(float(total.flatten()[i]), hyps[int(i) // vocab][1] + [int(i) % vocab]) for i in best]
        rows.append(hyps[0][1])
    return torch.tensor(rows, dtype=torch.long), scores


def optimize_soft(front: FrontPart, hidden: torch.Tensor, mask: torch.Tensor, iterations: int = 200,
                  lr: float = 0.1, cos_weight: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Soft token distributions [B, T, V] (logits) whose mixed embeddings, run through the front, match
    the observation in L2 (relative) + ``cos_weight`` × (1 − cosine) per position."""
    nv = front.num_virtual_tokens
    weight = front.embeddings.weight.detach()
    batch, tokens = hidden.shape[0], hidden.shape[1] - nv
    g = torch.Generator().manual_seed(seed)
    logits = (0.01 * torch.randn(batch, tokens, weight.shape[0], generator=g, dtype=weight.dtype)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    target = hidden[:, nv:].to(weight.dtype)
    valid = mask[:, nv:].to(weight.dtype)
    scale = (target ** 2).sum(-1).mean().clamp_min(1e-12)
    for _ in range(iterations):
        opt.zero_grad()
        out = _embeds_forward(front, torch.softmax(logits, -1) @ weight, mask[:, nv:])[:, nv:]
        l2 = ((out - target) ** 2).sum(-1) / scale
        cos = 1 - torch.nn.functional.cosine_similarity(out, target, dim=-1)
        loss = ((l2 + cos_weight * cos) * valid).sum() / valid.sum().clamp_min(1)
        loss.backward()
        opt.step()
    return logits.detach()


def decode_coordinate(front: FrontPart, hidden: torch.Tensor, mask: torch.Tensor, init: torch.Tensor,
                      candidates: torch.Tensor, metric: str = "l2", sweeps: int = 6) -> tuple[torch.Tensor, int]:
    """Coordinate search: per position, the candidate (``candidates`` [B, T, k]) that best matches the
    observation at *every* position with the others fixed; sweeps until nothing changes."""
    nv = front.num_virtual_tokens
    ids = init.clone()
    done = 0
    while done < sweeps:
        done += 1
        changed = False
        for b in range(ids.shape[0]):
            m, obs = mask[b:b + 1], hidden[b, nv:]
            for t in range(ids.shape[1]):
                cand = torch.unique(torch.cat([candidates[b, t], ids[b, t:t + 1]]))
                seqs = ids[b].expand(len(cand), -1).clone()
                seqs[:, t] = cand
                d = torch.cat([_dist(_ids_forward(front, seqs[s], m[:, nv:].expand(s.stop - s.start, -1))[:, nv:],
                                     obs, metric).sum(-1) for s in _chunks(len(cand), ids.shape[1] + nv)])
                best = int(cand[int(d.argmin())])
                if best != int(ids[b, t]):
                    ids[b, t], changed = best, True
        if not changed:
            break
    return ids, done


def residuals(front: FrontPart, hidden: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Per row: ||front(decoded) − observed|| / ||observed|| over the token positions (0 = certified match)."""
    nv = front.num_virtual_tokens
    out = _ids_forward(front, ids, mask[:, nv:])[:, nv:]
    obs = hidden[:, nv:]
    return [float((out[b] - obs[b]).norm() / obs[b].norm().clamp_min(1e-300)) for b in range(ids.shape[0])]


# ---------------------------------------------------------------------- the attack

@register_attack("smashed")
def run(obs: Any, method: str = "auto", metric: str = "l2", beam: int = 1, dropout: float | None = None,
        iterations: int = 200, lr: float = 0.1, topk: int = 64, sweeps: int = 6, init: str = "nearest",
        dtype: torch.dtype = torch.float64, seed: int = 0, **_: Any) -> AttackResult:
    """Invert one step's activations; see the module doc for ``method``. ``dropout``: the embedding
    dropout assumed by ``nearest`` (default: the config's, if the client trained, else 0)."""
    if not isinstance(obs, SplitObservation):
        raise NotApplicable("smashed inverts split-learning activations (a SplitObservation), not adapter updates")
    front = obs.front(dtype)
    hidden, mask = obs.hidden.to(dtype), obs.attention_mask.long()
    vocab = front.embeddings.weight.shape[0]
    if method == "auto":
        method = "nearest" if not len(front.layers) else "causal" if is_causal(front) else "coordinate"
    if method == "nearest" and len(front.layers):
        raise NotApplicable("nearest-embedding decoding needs front_layers = 0")
    if method == "causal" and not is_causal(front):
        raise NotApplicable("the left-to-right search needs a causal front (GPT-2, LLaMA)")
    extra: dict[str, Any] = {"method": method}
    if method == "nearest":
        p = embedding_dropout(front) if dropout is None and obs.train_mode else float(dropout or 0.0)
        table_scale = float(front.embeddings.weight.std())
        sigma = max(obs.activation_noise, 1e-3 * table_scale)
        ids, post = decode_nearest(front, hidden, sigma, p)
        scores = post
        extra["dropout"] = p
    elif method == "causal":
        ids, scores = decode_causal(front, hidden, mask, metric, beam)
    else:
        if method == "optimize" or init == "optimize":
            logits = optimize_soft(front, hidden, mask, iterations, lr, seed=seed)
        else:  # nearest-embedding start: the residual stream still carries the token
            logits = _nearest_logits(front, hidden)
        if method == "optimize":
            ids = logits.argmax(-1)
        else:
            cands = torch.topk(logits, min(topk, vocab), dim=-1).indices
            ids, extra["sweeps"] = decode_coordinate(front, hidden, mask, logits.argmax(-1), cands, metric, sweeps)
        scores = torch.softmax(logits, -1)
    res = residuals(front, hidden, mask, ids)
    extra["residual"] = res
    extra["certified"] = [r < 1e-5 for r in res]
    extra["positions"] = [(t, int(v)) for row in ids.tolist() for t, v in enumerate(row)]
    flat = scores.reshape(-1, vocab).float()
    flat = flat - flat.min(-1, keepdim=True).values
    token_scores = flat.max(0).values
    return AttackResult("smashed", token_scores=token_scores,
                        position_scores=scores[0].float() if scores.shape[0] == 1 else None,
                        bag=sorted(set(ids.flatten().tolist())), sequences=ids.tolist(), extra=extra)


def _nearest_logits(front: FrontPart, hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, V]: minus the squared distance of each observed position to every token's embedding output."""
    nv = front.num_virtual_tokens
    out = []
    for t in range(nv, hidden.shape[1]):
        table = embedding_table(front, t)
        out.append(-torch.cdist(hidden[:, t], table) ** 2)
    return torch.stack(out, 1)
