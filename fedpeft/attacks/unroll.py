"""``unroll``: search for the client's text by replaying its whole local training (multi-step threat model).

The server holds the model, the global adapter the client started from and the public training recipe
(optimizer, learning rate, local steps, weight decay, gradient clip). For any candidate text it can replay the client's
local training and compare the update that comes out with the one it received. The true text reproduces
it (to float rounding: cosine 1); on a tiny LLaMA after five AdamW steps a text with one wrong token
reaches a cosine of about 0.55-0.70, and every further wrong token or misplaced pair lowers it. The replay
is therefore a verifier of whole texts, where the single-step attacks only score tokens: this attack
searches over texts with it.

Start: the picks of a ranking attack (``sign_span`` for an Adam(W) client, ``span`` otherwise) in pick order, the
remaining positions filled from a *pool*: the picks and the ``pool`` tokens that correlate most with what the picks
leave unexplained (the residual of the first block's sign fit). Moves: swap two positions, move one token, insert
or delete a token (the tail shifts), put a pool token at one position. Each round replays ``batch`` distinct
proposals at once and keeps the best one if it raises the cosine; the search stops at cosine ``done`` or after
``replays`` replays. Tokens outside the pool are never tried by the search. ``fill`` then refills from the whole
vocabulary (:func:`_refill`), each step at two places, the best kept: a token in place at the earliest
unconfirmed position, a token inserted where one is likeliest missing (:func:`_gap`), and besides every deletion
(:func:`_deletion`: the tail shifts left, the freed end from the label channel). A scan scores every
vocabulary token in one pass by its first step's direction (for Adam, the gradient's signs) against the update, then
replays the best few in full (:func:`_fill_position`).
The recovered text is the sequence; its bag keeps the tokens the replay confirms and the start's picks it does
not refute (:func:`_confirmed`), so fillers the search could not place do not count as found.

The replay swaps every LoRA layer of a copy of the base model for a batched one (one LoRA pair per
candidate text), so a single forward and backward pass trains ``batch`` candidates; the optimizer step is
applied per candidate with the public settings (torch's defaults for Adam's betas and epsilon, constant
learning rate, the client's clip of the gradient's total norm, mean token cross-entropy as the causal-LM
loss). Applies to one example (batch size 1) of a causal LM whose LoRA update arrived as a delta (or as the
gradient of one SGD step), without dropout, or with dropout after one SGD step: the replay has no masks, so its
cosines are then taken away from the dropout noise directions (:meth:`Replay.denoise`). For learned-position
models the start is each position's best token and a per-position sweep follows the search (:func:`_sweep`); for
a gradient the last token comes from the label channel (:func:`_label_tail`). Under dropout no cosine reaches
``done``: the search and the refill then also stop where the text explains the update to within the dropout noise
(:meth:`Replay.consistency`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fedpeft.attacks.lora_io import dropout_directions, dropout_gradients
from fedpeft.attacks.observation import AttackResult, NotApplicable, Observation, register_attack, run_attack
from fedpeft.attacks.sign_span import logistic_fit, update_rows
from fedpeft.attacks.span import first_layer
from fedpeft.attacks.span_decode import last_tokens, next_tokens
from fedpeft.training import select_device

log = logging.getLogger(__name__)
Last = Callable[[list[int]], int]  #: the token that ends a client text after a prefix
Nexts = Callable[[list[int], int], list[int]]  #: a short list of tokens after a prefix, in a text of so many labels

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  #: torch's defaults, what a client that sets none uses


class _BatchedLoRA(torch.nn.Module):
    """A frozen linear layer plus one LoRA pair per batch row: x (n, T, in) ↦ base(x) + s · x A_nᵀ B_nᵀ."""

    def __init__(self, base: torch.nn.Module, scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.A: torch.Tensor | None = None  # (n, r, in), set before each pass
        self.B: torch.Tensor | None = None  # (n, out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.A is not None and self.B is not None
        low = torch.bmm(x, self.A.transpose(1, 2))
        return self.base(x) + self.scaling * torch.bmm(low, self.B.transpose(1, 2))


class Replay:
    """The client's local training replayed on many candidate texts at once, in float32, on ``device``
    (``select_device``'s choice by default: a CUDA GPU where there is one, else the CPU)."""

    def __init__(self, obs: Observation, device: torch.device | None = None) -> None:
        self.device = device or select_device("auto")
        model = copy.deepcopy(obs.working_model().get_base_model()).float().to(self.device)
        self.layers: dict[str, _BatchedLoRA] = {}
        for path, module in list(model.named_modules()):
            if "default" in getattr(module, "lora_A", {}):
                parent, _, leaf = path.rpartition(".")
                batched = _BatchedLoRA(module.base_layer, float(module.scaling["default"]))
                setattr(model.get_submodule(parent), leaf, batched)
                self.layers[path] = batched
        for p in model.parameters():
            p.requires_grad_(False)
        # eval mode: the client's computation where it trained without dropout; with dropout (one SGD step only,
        # checked by the attack) the maskless replay, compared away from the noise directions (:meth:`denoise`)
        self.model = model.eval()
        self.names: dict[str, tuple[str, str]] = {}  # adapter state name -> (layer path, "A" / "B")
        for name in obs.global_state:
            for path in self.layers:
                for factor in ("A", "B"):
                    if name.startswith(f"base_model.model.{path}.lora_{factor}."):
                        self.names[name] = (path, factor)
        if set(self.names) != set(obs.global_state) or not self.names:
            raise NotApplicable("unroll replays LoRA adapters only (every adapter tensor a LoRA A or B factor)")
        self.obs = obs
        self.vocab = int(obs.working_model().get_input_embeddings().weight.shape[0])
        self.pad = getattr(obs.working_model().config, "pad_token_id", None) or 0  # what _falls and _gap put in
        self.start = {n: obs.global_state[n].detach().float().to(self.device) for n in self.names}
        # a "gradient" observation is a one-step SGD delta rescaled by -1/lr: its replayed delta points the other way
        sign = -1.0 if obs.kind == "gradient" else 1.0
        self.target = sign * torch.cat([obs.update[n].detach().float().flatten() for n in self.names]).to(self.device)
        self.splits = self._logits_split()
        self.noise: torch.Tensor | None = None  # directions of the client's dropout noise (:meth:`denoise`)
        self._noise_at: tuple[tuple[int, ...], int] | None = None  # the text and masks ``noise`` was drawn with
        self._p_values: dict[tuple[Any, ...], float] = {}  # :meth:`consistency` per text and settings

    def denoise(self, text: list[int], samples: int) -> None:
        """Compare updates from now on away from the client's dropout noise: the principal directions of the
        loss gradient at ``text`` across ``samples`` dropout masks the server draws itself
        (:func:`fedpeft.attacks.lora_io.dropout_directions`; one SGD step, where the update is that gradient).
        Without them a replay (no masks) of a wrong text can match a dropout client's update better than the
        true text does (measured: 0.80 against 0.78 on a GPT-2 over WordPiece); with them the true text scored
        above the current one at every sweep of the searches measured (docs/audit.md)."""
        self.noise = self._directions(text, samples)
        self._noise_at = (tuple(text), samples)

    def _directions(self, text: list[int], samples: int) -> torch.Tensor:
        """The principal directions of the dropout noise at ``text`` (:meth:`denoise`), on ``device``; those in
        use where they were drawn at the same text with as many masks (the same draw: the masks' seed is fixed)."""
        if self.noise is not None and self._noise_at == (tuple(text), samples):
            return self.noise
        return dropout_directions(*self._dropout_loss(text), samples).float().to(self.device)

    def _dropout_loss(self, text: list[int]) -> tuple[torch.nn.Module, list[torch.nn.Parameter],
                                                         Callable[[], torch.Tensor]]:
        """The client's model, its adapter parameters (``names`` order) and its loss on ``text``: what
        :func:`fedpeft.attacks.lora_io.dropout_gradients` draws dropout masks over."""
        model = self.obs.working_model()
        named = dict(model.named_parameters())
        ids = torch.tensor([text])
        return model, [named[n] for n in self.names], lambda: model(input_ids=ids, labels=ids).loss

    def consistency(self, text: list[int], samples: int = 128, directions: int = 1024, seed: int = 1) -> float:
        """Whether ``text`` explains the received update up to the client's dropout noise (one SGD step): the
        rank p-value (1 + #{c_j <= c}) / (samples + 1) of the received update's cosine c with ``text``'s replay
        among the cosines c_j of ``samples`` updates the server draws itself at ``text`` with fresh dropout masks
        (clipped and decayed as the client's step), all compared away from ``directions`` noise directions drawn
        at ``text`` itself (:meth:`denoise`'s, independent of the search's current ones). Where
        ``text`` is the client's, the received update is one more such draw, so the p-value is uniform; a wrong
        text's update matches worse than its own draws (measured on a GPT-2 over WordPiece at r = 8, docs/audit.md:
        the truth's rank among 128 draws spread over 3-127 on twelve sentences; one wrong token or one deletion
        put the received update 1.3-7 standard deviations below the draws' mean). ``seed``: the draws' masks, other
        than the directions' (seed 0): draws from those masks would lie in the span the projection removes."""
        obs, key = self.obs, (tuple(text), samples, directions, seed)
        if key in self._p_values:
            return self._p_values[key]
        draws = dropout_gradients(*self._dropout_loss(text), samples, seed).float().to(self.device)
        if obs.max_grad_norm > 0:  # the client's clip of the gradient's total norm
            draws = draws * _clip_scale(draws.norm(dim=1, keepdim=True), obs.max_grad_norm)
        start = torch.cat([self.start[n].flatten() for n in self.names])
        draws = -obs.lr * (draws + obs.weight_decay * start)  # the one SGD step's delta, as :meth:`updates`
        noise = self._directions(text, directions)
        replayed = _away(self.updates(torch.tensor([text])), noise)
        cos = F.cosine_similarity(replayed, _away(draws, noise))
        received = F.cosine_similarity(replayed, _away(self.target[None], noise))
        p = self._p_values[key] = float((1 + (cos <= received).sum()) / (samples + 1))
        log.info("unroll: consistency of the text with the update under dropout: p = %.3f", p)
        return p

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (rows of updates) without its components along the dropout noise directions, if any."""
        return x if self.noise is None else _away(x, self.noise)

    def updates(self, texts: torch.Tensor) -> torch.Tensor:
        """The update (local − global, flattened in ``names`` order) the client would send for each row."""
        obs, n, texts = self.obs, texts.shape[0], texts.to(self.device)
        opt = obs.optimizer.lower()
        params = {k: v[None].repeat(n, *([1] * v.dim())) for k, v in self.start.items()}
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v2 = {k: torch.zeros_like(v) for k, v in params.items()}
        (b1, b2), decay = ADAM_BETAS, 1 - obs.lr * obs.weight_decay  # AdamW's decoupled decay
        for step in range(1, obs.local_steps + 1):
            live = {k: p.requires_grad_(True) for k, p in params.items()}
            grads = self._gradients(live, texts)
            with torch.no_grad():
                if obs.max_grad_norm > 0:  # torch's clip_grad_norm_, per candidate over every adapter tensor
                    norm = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
                    coef = _clip_scale(norm, obs.max_grad_norm)
                    grads = tuple(g * coef.view(-1, *([1] * (g.dim() - 1))) for g in grads)
                for (k, p), g in zip(live.items(), grads):
                    p = p.detach()
                    if opt == "sgd":
                        params[k] = p - obs.lr * (g + obs.weight_decay * p)
                        continue
                    m[k].mul_(b1).add_(g, alpha=1 - b1)
                    v2[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v2[k].sqrt() / (1 - b2 ** step) ** 0.5).add_(ADAM_EPS)
                    params[k] = p * decay - (obs.lr / (1 - b1 ** step)) * m[k] / denom
        return torch.cat([(params[k] - self.start[k][None]).reshape(n, -1) for k in self.names], 1)

    def _load(self, params: dict[str, torch.Tensor]) -> None:
        """Put one LoRA pair per batch row into the batched layers (``params``: adapter state name -> (n, ...))."""
        for k, (path, factor) in self.names.items():
            setattr(self.layers[path], factor, params[k])

    def _gradients(self, live: dict[str, torch.Tensor], texts: torch.Tensor,
                   fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Each text's loss gradient at its own adapter ``live`` (one LoRA pair per row). ``fixed``: the gradient
        of the first ``len(fixed)`` loss terms on the hidden states, shared by every text (:meth:`_prefix_gradient`)."""
        self._load(live)
        if fixed is None:
            logits = self.model(input_ids=texts).logits[:, :-1]
            labels = texts[:, 1:]
            shared = 0.0
        else:
            body, head = self._split()
            hidden = body(input_ids=texts).last_hidden_state
            logits = head(hidden[:, len(fixed):-1])
            labels = texts[:, len(fixed) + 1:]
            shared = (hidden[:, :len(fixed)] * fixed).sum()  # the shared terms' gradient, through the hidden states
        loss = (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
                + shared) / (texts.shape[1] - 1)  # the sum of every text's mean loss
        return torch.autograd.grad(loss, list(live.values()))

    def first_step_alignment(self, texts: list[list[int]], chunk: int = 256, prefix: int = 0) -> torch.Tensor:
        """Cosine between the direction of each text's first step at the global adapter (the negative loss
        gradient; its signs for Adam(W)) and the received update: one pass instead of a replay, to shortlist
        candidates. Texts that share their first ``prefix`` tokens (a scan of one position) share those positions'
        logits in a causal LM: their loss terms enter as one fixed gradient on the hidden states
        (:meth:`_prefix_gradient`), so the output layer runs only on the later positions (the same gradient, at a
        fraction of the cost)."""
        fixed = self._prefix_gradient(texts[0][:prefix]) if prefix >= 2 and self.splits else None
        out = []
        for i in range(0, len(texts), chunk):
            rows = torch.tensor(texts[i:i + chunk], device=self.device)
            live = {k: v[None].repeat(len(rows), *([1] * v.dim())).requires_grad_(True) for k, v in self.start.items()}
            grads = self._gradients(live, rows, fixed)
            flat = -torch.cat([g.detach().reshape(len(rows), -1) for g in grads], 1)
            if self.obs.optimizer.lower().startswith("adam"):
                flat = torch.sign(flat)  # Adam's first step moves every coordinate by lr along the gradient's sign
            out.append(F.cosine_similarity(self._project(flat), self._project(self.target[None])).cpu())
        return torch.cat(out)

    def _prefix_gradient(self, prefix: list[int]) -> torch.Tensor:
        """The gradient of the loss terms that lie inside ``prefix`` (positions 0 .. len − 2, whose logits and
        labels every text with this prefix shares) on the final hidden states, at the global adapter."""
        body, head = self._split()
        self._load({k: v[None] for k, v in self.start.items()})
        with torch.no_grad():
            hidden = body(input_ids=torch.tensor([prefix], device=self.device)).last_hidden_state[0, :-1]
        hidden.requires_grad_(True)
        loss = F.cross_entropy(head(hidden), torch.tensor(prefix[1:], device=self.device), reduction="sum")
        return torch.autograd.grad(loss, hidden)[0]

    def _split(self) -> tuple[Any, Any]:
        """The causal LM's body (input ids to final hidden states) and its output layer (None where it has none)."""
        model: Any = self.model  # a transformers causal LM
        return getattr(model, str(model.base_model_prefix), None), model.get_output_embeddings()

    def _logits_split(self) -> bool:
        """Whether the model's logits are its output layer on its body's hidden states (no scaling or capping in
        between), checked on a short text: only then can a scan skip its shared prefix's output layer."""
        body, head = self._split()
        if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Module):
            return False
        text = torch.arange(4, device=self.device)[None] % self.vocab
        self._load({k: v[None] for k, v in self.start.items()})
        with torch.no_grad():
            whole = self.model(input_ids=text).logits
            split = head(body(input_ids=text).last_hidden_state)
        return bool(torch.allclose(whole, split, rtol=1e-5, atol=1e-6))

    def cosines(self, texts: list[list[int]], chunk: int = 64) -> list[float]:
        """Cosine between each text's replayed update and the received one."""
        out: list[float] = []
        for i in range(0, len(texts), chunk):
            ups = self.updates(torch.tensor(texts[i:i + chunk]))
            out += F.cosine_similarity(self._project(ups), self._project(self.target[None])).tolist()
        return out


def _clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor torch's ``clip_grad_norm_`` scales gradients of total norm ``norm`` by (at most 1)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def _away(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` without their components along the orthonormal columns of ``noise``."""
    return x - (x @ noise) @ noise.T


def _start(obs: Observation, pool: int,
           per_position: int = 32) -> tuple[list[int], list[int], torch.Tensor, list[list[int]]]:
    """The ranking attack's picks (pick order), the pool (picks first, then the ``pool`` tokens that correlate
    most with what the picks leave unexplained in the first block's signs), the attack's token scores and, where
    it scores positions (learned positions), each position's ``per_position`` best tokens (else empty)."""
    adam = obs.optimizer.lower().startswith("adam")
    first = run_attack("sign_span" if adam else "span", obs)
    assert first.token_scores is not None
    pairs = first.extra.get("picks", []) if adam else []
    picks = list(dict.fromkeys(v for _, v in pairs)) if adam else list(first.bag)
    scores = first.token_scores.to(torch.float64).clone()
    if pairs:
        group, cands, _ = first_layer(obs)
        signs = torch.sign(update_rows(obs, group, cands.shape[-1]))

        def unit(x: torch.Tensor) -> torch.Tensor:
            x = x.to(torch.float64)
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

        margins, _, _ = logistic_fit(unit(torch.stack([cands[p, v] for p, v in pairs])), signs)
        resid = signs * torch.sigmoid(-signs * margins)
        scores = torch.stack([((resid @ unit(cands[p]).T) ** 2).sum(0) for p in range(cands.shape[0])]).amax(0)
    scores[picks] = -1.0
    extra = [v for v in torch.topk(scores, min(pool, scores.numel())).indices.tolist() if v not in picks]
    ranked = first.position_scores
    positional = [] if ranked is None else [torch.topk(row, min(per_position, row.numel())).indices.tolist()
                                             for row in ranked]
    return picks, picks + extra, first.token_scores, positional


@register_attack("unroll")
def run(obs: Observation, pool: int = 300, replays: int = 20000, batch: int = 48, done: float = 0.9999,
        seed: int = 0, fill: int = 8, shortlist: int = 64, device: str = "auto", noise_samples: int = 1024,
        refresh: int = 2000, sweeps: int = 4, stop_p: float = 0.5, **_: Any) -> AttackResult:
    """Local search over texts scored by the replayed update's cosine with the received one (module docstring).
    ``pool``: extra candidate tokens beside the start's picks; ``replays``: the budget of replayed texts;
    ``batch``: proposals per round (one batched replay); ``done``: the cosine that ends the search and the refill;
    ``fill``: after the search, up to this many refill steps (:func:`_refill`), each a scan of the whole vocabulary
    at the earliest unconfirmed position (in place; else the least confirmed) and at the likeliest place of a
    missing token (inserted, :func:`_gap`) (:func:`_fill_position`: a one-pass shortlist, then ``shortlist`` full
    replays), every deletion (:func:`_deletion`) and, for a gradient, the last two tokens from the label channel
    (:func:`_tail`); ``device``: where the replays run (``auto``: a CUDA GPU where there is one). After the search,
    up to ``sweeps`` rounds of :func:`_sweep` (learned positions: each position's own best tokens) and
    :func:`_label_tail` (a gradient: the last token from the label channel). A client with dropout (one SGD step
    only): cosines are measured away from ``noise_samples`` directions of dropout noise (:meth:`Replay.denoise`),
    re-estimated at the best text every ``refresh`` replays of the search and at each sweep round (1,024 by
    default: on a GPT-2 over WordPiece at r = 8 the truth's lead over a text with four wrong tokens was 0.045 with
    256 and 0.099 with 1,024). Where dropout keeps every cosine far below ``done``, the search (at each
    re-estimate) and the refill (after a step that found nothing better) end once the text explains the update to
    within the dropout noise: :meth:`Replay.consistency` at least ``stop_p`` (0: never). The truth stops there with
    probability 1 - ``stop_p``; a wrong text that stops there ends the attack short of the sentence, so the default
    is the cautious one (no wrong text measured reached 0.5, docs/audit.md)."""
    one_sgd_step = obs.local_steps == 1 and obs.optimizer.lower() == "sgd"
    if obs.batch_size != 1 or not (obs.kind == "delta" or one_sgd_step):
        raise NotApplicable(f"unroll replays one example's local training (batch size {obs.batch_size}, "
                            f"update kind {obs.kind!r}; a gradient only from one SGD step)")
    if obs.task != "causal_lm":
        raise NotApplicable(f"unroll replays a causal LM (task {obs.task!r})")
    if obs.dropout > 0 and not one_sgd_step:
        raise NotApplicable(f"unroll replays several local steps without dropout only (dropout {obs.dropout:g}): "
                            "the client's masks are not public, and only one SGD step's noise is measured away")
    if obs.schedule != "constant":
        raise NotApplicable(f"unroll replays a constant learning rate (schedule {obs.schedule!r})")
    if obs.optimizer.lower() not in ("sgd", "adamw") and not (obs.optimizer.lower() == "adam" and not obs.weight_decay):
        raise NotApplicable(f"unroll replays SGD, AdamW and Adam without weight decay (optimizer {obs.optimizer!r}, "
                            f"weight decay {obs.weight_decay:g})")
    replay = Replay(obs, select_device(device))
    picks, pool_ids, token_scores, positional = _start(obs, pool)
    length = obs.seq_len
    if positional:  # learned positions: each position's best token
        current = [cands[0] for cands in positional][:length]
    else:
        current = (picks + [v for v in pool_ids if v not in picks])[:length]
    current += [current[-1]] * (length - len(current))
    noisy = obs.dropout > 0 and noise_samples > 1
    stop = (lambda text: replay.consistency(text, directions=noise_samples) >= stop_p) \
        if noisy and stop_p > 0 else None
    if noisy:
        replay.denoise(current, noise_samples)
    best = replay.cosines([current])[0]
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(len(pool_ids))
    weights[:len(picks)] = 3.0  # the picks are right far more often than the rest of the pool
    used, rounds, denoised = 1, 0, 0
    while used < replays and best < done and rounds < replays:
        if noisy and used - denoised >= refresh:  # the noise directions of a text nearer the client's
            replay.denoise(current, noise_samples)
            best, denoised = replay.cosines([current])[0], used
            if stop is not None and stop(current):
                break
        proposals = {tuple(_propose(current, pool_ids, weights, g, positional)) for _ in range(batch)}
        proposals.discard(tuple(current))
        texts = [list(p) for p in proposals]
        rounds += 1
        if not texts:  # a pool of one token: every move gives the same text
            continue
        current, best = _keep_best(replay, texts, current, best)
        used += len(texts)
        if rounds % 50 == 0:
            log.info("unroll: %d replays, cosine %.4f", used, best)
    for _sweep_round in range(sweeps):  # each position's own candidates, then the last token from the labels
        if noisy:
            replay.denoise(current, noise_samples)
            best = replay.cosines([current])[0]
        before_sweep = current
        current, best, spent = _sweep(replay, current, best, positional)
        used += spent
        current, best = _label_tail(obs, replay, current, best, noise_samples)
        if current == before_sweep:
            break
    falls = _falls(replay, current, best)
    used += len(current)
    before = (best, _confirmed(current, falls, picks))
    current, best, falls, spent = _refill(replay, current, best, falls, fill, shortlist, done,
                                          lambda prefix: _last_token(obs, replay, prefix, noise_samples),
                                          _next_reader(obs, noise_samples), stop)
    used += spent
    confirmed = _confirmed(current, falls, picks)
    extra = {"consistency": replay.consistency(current, directions=noise_samples)} if noisy else {}
    scores = token_scores.clone().float()
    scores[current] = scores.max() + 1.0
    scores[confirmed] = scores.max() + 1.0
    return AttackResult("unroll", token_scores=scores, bag=confirmed, sequences=[current],
                        extra={"cosine": best, "cosine_before_fill": before[0], "bag_before_fill": before[1],
                               "replays": used, "picks": picks, "pool": len(pool_ids), **extra})


def _refill(replay: Replay, text: list[int], cosine: float, falls: list[float], steps: int, shortlist: int,
            done: float, last: Last, nexts: Nexts | None = None,
            stop: Callable[[list[int]], bool] | None = None) -> tuple[list[int], float, list[float], int]:
    """Up to ``steps`` refill steps from the whole vocabulary, each scanning two places of ``text``
    (:func:`_fill_position`): the earliest unconfirmed position in place (a causal LM's late tokens move the update
    least, so the least confirmed position is nearly always the last one, where a fix gains least; where every
    position is confirmed, the least confirmed not yet scanned in vain) and the likeliest place of a missing token,
    inserted (:func:`_gap`: a run of right tokens one place early looks confirmed); and every deletion
    (:func:`_deletion`, ``last`` filling the freed end: a token the text lacks leaves the rest one place late); and,
    where the label channel reads ``nexts``, the last two tokens from it (:func:`_tail`) in the text and in its
    best deletion (a stray token deleted leaves the end to fix). The best is kept if it raises the cosine (the
    inserted token alone can raise it while the tail it shifts was right: scanned first, it used to take the place
    of the token in place). Returns the text, its cosine, its ``falls`` (:func:`_falls`) and the replays spent.
    Ends early at cosine ``done``, or after a step that found nothing better where ``stop(text)`` holds."""
    used = 0
    vain: set[tuple[int, bool]] = set()  # (position, inserted) scans that found nothing better in the current text
    moved_in_vain = False  # every deletion (and the tail read) tried in the current text
    for _step in range(steps):
        if cosine >= done:
            break
        level = _level(falls)
        unscanned = [i for i in range(len(text)) if (i, False) not in vain]
        below = [i for i in unscanned if falls[i] < level]  # else the least confirmed: noise can lift a wrong token
        in_place = below[0] if below else min(unscanned, key=falls.__getitem__, default=None)  # over the level
        gap, spent = _gap(replay, text, {p for p, inserted in vain if inserted})
        used += spent
        scans = [(p, inserted) for p, inserted in ((in_place, False), (gap, True)) if p is not None]
        if not scans and moved_in_vain:
            break  # every place scanned in vain
        found = []
        if not moved_in_vain:
            new, new_cosine, spent = _deletion(replay, text, cosine, last)
            used += spent
            found.append((new_cosine, new))
            if nexts is not None:
                for base, base_cosine in ((text, cosine), (new, new_cosine)):  # the text and its best deletion
                    tailed, tailed_cosine, spent = _tail(replay, base, base_cosine, last, nexts)
                    used += spent
                    found.append((tailed_cosine, tailed))
        for position, inserted in scans:
            new, new_cosine, spent = _fill_position(replay, text, cosine, position, shortlist, inserted)
            used += spent
            found.append((new_cosine, new))
            if new_cosine >= done:
                break  # the sentence: no need for the other place
        best_cosine, best_text = max(found, key=lambda f: f[0])
        if best_cosine > cosine:
            text, cosine, vain, moved_in_vain = best_text, best_cosine, set(), False
            falls = _falls(replay, text, cosine)
            used += len(text)
        else:
            vain.update(scans)  # a second scan of these places, in the same text, would find the same
            moved_in_vain = True
            if stop is not None and stop(text):
                break
    return text, cosine, falls, used


def _deletion(replay: Replay, text: list[int], cosine: float, last: Last,
              keep: int = 3) -> tuple[list[int], float, int]:
    """Every position of ``text`` but the last deleted in turn (the tail shifts left, the last token repeated at
    the end); for the ``keep`` best of these, the freed last place filled by ``last(prefix)`` (the label channel
    where there is one: a call costs about as much as 500 replays).
    A search that put in a token the client's text lacks leaves the rest one place late, and no single token put
    in place or inserted undoes that (measured on a GPT-2 over WordPiece with dropout at r = 8: one stray token
    before the last four, where the in-place and inserted scans found nothing better; the stray's deletion ranked
    first of the deletions and, with the label channel's last token, raised the cosine from 0.486 to 0.513, the
    truth's 0.555, one in-place scan away). Returns the best deletion, also where it does not raise the cosine
    (the caller may still fix its end, :func:`_tail`), its cosine and the replays spent."""
    shorter = [text[:p] + text[p + 1:] for p in range(len(text) - 1)]
    if not shorter:
        return text, cosine, 0
    cos = replay.cosines([s + [text[-1]] for s in shorter])
    order = sorted(range(len(shorter)), key=lambda i: -cos[i])[:keep]
    filled = [shorter[i] + [last(shorter[i])] for i in order]
    texts, cos = [shorter[order[0]] + [text[-1]], *filled], [cos[order[0]], *replay.cosines(filled)]
    i = max(range(len(cos)), key=cos.__getitem__)
    log.info("unroll: best of %d deletions: cosine %.4f (was %.4f)", len(shorter), cos[i], cosine)
    return texts[i], cos[i], len(shorter) + len(filled)


def _tail(replay: Replay, text: list[int], cosine: float, last: Last,
          nexts: Nexts) -> tuple[list[int], float, int]:
    """The last two tokens of ``text`` from the label channel: ``nexts``' short list for the place before the last
    (each replayed with the current last token), then the token that ends the text after the list's first and
    after the best replayed (``last``); the best of these kept if it raises the cosine. A causal LM's last tokens
    move the update least, so the replay's scans rank the true ones low there, where the label channel reads
    them best (:func:`fedpeft.attacks.span_decode.next_tokens`). Returns the text, its cosine and the replays
    spent (each label channel read costs about as much as 500 replays)."""
    if len(text) < 3:
        return text, cosine, 0
    head = text[:-2]
    cands = nexts(head, len(text) - 1)
    if not cands:
        return text, cosine, 0
    texts = [head + [c, text[-1]] for c in cands]
    cos = replay.cosines(texts)
    best = cands[max(range(len(cos)), key=cos.__getitem__)]
    ended = [head + [c, last(head + [c])] for c in dict.fromkeys([cands[0], best])]
    texts, cos = texts + ended, cos + replay.cosines(ended)
    i = max(range(len(cos)), key=cos.__getitem__)
    log.info("unroll: the last two tokens from the label channel: cosine %.4f (was %.4f)", cos[i], cosine)
    return (texts[i], cos[i], len(texts)) if cos[i] > cosine else (text, cosine, len(texts))


def _next_reader(obs: Observation, noise_samples: int, k: int = 8) -> Nexts | None:
    """``nexts`` for :func:`_tail`: the label channel's ``k`` likeliest tokens after a prefix in a text of the
    given number of labels; None for a delta (no label channel)."""
    if obs.kind != "gradient":
        return None
    return lambda prefix, labels: next_tokens(obs, prefix, labels, k, noise_samples) or []


def _sweep(replay: Replay, text: list[int], cosine: float,
           positional: list[list[int]]) -> tuple[list[int], float, int]:
    """One pass over the positions, each trying its own candidates (``positional``: a learned-position model's
    best tokens per position, from the span ranking) in place and keeping the best if it raises the cosine.
    Targeted where the search's random moves are not: a true token ranked 15th at its position is one of 32
    here, and one of about 400 x 13 (token, position) pairs for a random move. Returns the text, its cosine and
    the replays spent."""
    used = 0
    for position, cands in enumerate(positional[:len(text)]):
        texts = [_put(text, position, v) for v in cands if v != text[position]]
        if not texts:
            continue
        text, cosine = _keep_best(replay, texts, text, cosine)
        used += len(texts)
    return text, cosine, used


def _keep_best(replay: Replay, texts: list[list[int]], text: list[int], cosine: float) -> tuple[list[int], float]:
    """Replay ``texts``: the best of them and its cosine if it beats ``cosine``, else ``text`` and ``cosine``."""
    cos = replay.cosines(texts)
    i = max(range(len(cos)), key=cos.__getitem__)
    return (texts[i], cos[i]) if cos[i] > cosine else (text, cosine)


def _label_tail(obs: Observation, replay: Replay, text: list[int], cosine: float,
                noise_samples: int) -> tuple[list[int], float]:
    """``text`` with its last token from the label channel (:func:`_last_token`), kept if the replay matches
    better: the last token is an input nowhere, so the search's pool and the span ranking hold it only by chance."""
    if obs.kind != "gradient":
        return text, cosine
    tail = _last_token(obs, replay, text[:-1], noise_samples)
    return (text, cosine) if tail == text[-1] else _keep_best(replay, [text[:-1] + [tail]], text, cosine)


def _last_token(obs: Observation, replay: Replay, prefix: list[int], noise_samples: int) -> int:
    """The token after ``prefix`` if it ends the client's text: from the label channel for a gradient observation
    (:func:`fedpeft.attacks.span_decode.last_tokens`, ``noise_samples`` dropout masks); the pad token where the
    label channel does not apply (a delta, an output layer with a bias)."""
    tail = last_tokens(obs, [prefix], noise_samples=noise_samples) if obs.kind == "gradient" else None
    return tail[0] if tail else replay.pad


def _put(text: list[int], position: int, token: int, inserted: bool = False) -> list[int]:
    """``text`` with ``token`` at ``position``: in its token's place, or inserted before it (the tail shifts right,
    the last token falls off)."""
    if inserted:
        return (text[:position] + [token] + text[position:])[:len(text)]
    return text[:position] + [token] + text[position + 1:]


def _falls(replay: Replay, text: list[int], cosine: float) -> list[float]:
    """How much the cosine falls when the pad token takes each position's place in turn."""
    return [cosine - c for c in replay.cosines([_put(text, i, replay.pad) for i in range(len(text))])]


def _gap(replay: Replay, text: list[int], scanned: set[int]) -> tuple[int | None, int]:
    """Where a token is likeliest missing: the position (not in ``scanned``) at which the pad inserted, the tail
    shifted right, replays to the highest cosine (measured on tiny LLaMAs: the start of a run of right tokens one
    place early, which the falls call confirmed). The first and last positions are left out (inserting at the last
    only replaces its token). Returns the position (None if none is left) and the replays spent."""
    positions = [p for p in range(1, len(text) - 1) if p not in scanned]
    if not positions:
        return None, 0
    cos = replay.cosines([_put(text, p, replay.pad, inserted=True) for p in positions])
    return positions[max(range(len(cos)), key=cos.__getitem__)], len(positions)


def _level(falls: list[float]) -> float:
    """Half the median fall: a token whose fall reaches it is confirmed (measured near a solution on a tiny
    LLaMA: right tokens 0.12-0.30, a wrong last token 0.03)."""
    return 0.5 * sorted(falls)[len(falls) // 2]


def _confirmed(text: list[int], falls: list[float], picks: list[int]) -> list[int]:
    """The tokens of ``text`` the replay vouches for: putting the pad token in a token's place lowers the
    cosine by at least :func:`_level` (``falls`` from :func:`_falls`); the ranking attack's ``picks`` stay
    unless the replay refutes them (the pad in their place does not lower the cosine). Far from a solution
    the falls are noisy and the level drops right tokens, which the picks (rarely wrong) then keep."""
    level, keep = _level(falls), set(picks)
    return sorted({v for v, fall in zip(text, falls) if fall >= level or (v in keep and fall > 0)})


def _fill_position(replay: Replay, text: list[int], cosine: float, position: int, shortlist: int,
                   inserted: bool = False) -> tuple[list[int], float, int]:
    """Every vocabulary token at ``position``: in its token's place, or ``inserted`` before it (the tail shifts
    right, the last token falls off: a search that dropped a token the pool lacks leaves the rest one place early),
    scored by :meth:`Replay.first_step_alignment` in the context of the rest of ``text``; the ``shortlist`` best are
    replayed in full and the best kept if it raises the cosine. Returns the text, its cosine and the full replays
    spent."""
    texts = [_put(text, position, v, inserted) for v in range(replay.vocab)]
    top = torch.topk(replay.first_step_alignment(texts, prefix=position), shortlist).indices.tolist()
    cos = replay.cosines([texts[v] for v in top])
    i = max(range(len(cos)), key=cos.__getitem__)
    log.info("unroll: position %d, best of %d shortlisted tokens %s: cosine %.4f (was %.4f)", position, shortlist,
             "inserted" if inserted else "in place", cos[i], cosine)
    return (texts[top[i]], cos[i], len(top)) if cos[i] > cosine else (text, cosine, len(top))


def _propose(text: list[int], pool: list[int], weights: torch.Tensor, g: torch.Generator,
             positional: list[list[int]] | None = None) -> list[int]:
    """One random move: swap two positions (1/5), move one token (1/5), insert a pool token (the tail shifts right,
    the last token falls off; 1/10), delete a token (the tail shifts left, a pool token at the end; 1/10), put a
    pool token in a token's place (1/2). The shifts move a run of right tokens at a wrong offset in one step.
    ``positional`` (each position's best tokens, learned positions): half the tokens put in place are drawn from
    that position's own."""
    out = list(text)
    r = float(torch.rand(1, generator=g))
    i, j = torch.randint(0, len(out), (2,), generator=g).tolist()
    token = pool[int(torch.multinomial(weights, 1, generator=g))]
    if positional and i < len(positional) and float(torch.rand(1, generator=g)) < 0.5:
        token = positional[i][int(torch.randint(0, len(positional[i]), (1,), generator=g))]
    if r < 0.2:
        out[i], out[j] = out[j], out[i]
    elif r < 0.4:
        out.insert(j, out.pop(i))
    elif r < 0.5:
        out.insert(i, token)
        out.pop()
    elif r < 0.6:
        out.pop(i)
        out.append(token)
    else:
        out[i] = token
    return out
