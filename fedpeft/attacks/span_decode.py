"""``span_decode``: order the span attack's tokens into sequences with the second block (DAGER's
greedy decoder for causal models).

The layer-1 input at position p depends on tokens 0..p only (causal attention). The server knows the
global adapter, so it pushes every candidate prefix through block 0 and keeps the extensions whose
layer-1 input lies in the row space of the stacked layer-1 dL/dA. The last position of a causal-LM
sequence is invisible to every span test (δ = 0 there); for a single-step gradient it is recovered
from the label channel: the observed gradient minus everything the known prefix explains equals
−(1/N)·Σ_i ∇θ logit_{i,L−2}[y_i], matched over the whole vocabulary.

Causal models only: on a bidirectional encoder (BERT, MiniLM) the layer-1 input at a position depends
on the whole sentence, and the attack raises :class:`NotApplicable` (probed, not read from the task: a
GPT-2 classifier is decoded like a causal LM).

Padded batches: padding is masked out of attention and out of the loss (label -100), so it adds
nothing to the gradient, exactly like the last token. A prefix whose extensions all lie far outside
the span (relative to the residuals of the true extensions so far) has reached the end of its
sentence's visible part; the decoder ends it there instead of forcing a token, and the label channel
adds the sentence's last token. Sentences of different lengths come out with their own lengths,
without padding.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedpeft.attacks import span
from fedpeft.attacks.lora_io import (
    capture_inputs,
    dropout_directions,
    reads_left_to_right,
    residuals,
    row_basis,
    shared_groups,
)
from fedpeft.attacks.observation import AttackResult, NotApplicable, Observation, register_attack

log = logging.getLogger(__name__)


def _candidates(res0: AttackResult, positional: bool, seq_len: int, max_cands: int) -> list[list[int]]:
    """Candidate tokens per position from the layer-0 span result (its bag, else its top scores)."""
    if positional:
        hits = res0.extra.get("positions") or []
        per = [sorted({v for p, v in hits if p == pos}) for pos in range(seq_len)]
        consistent = res0.extra.get("consistent") or [[] for _ in range(seq_len)]
        if res0.bag:
            return [per[p] or consistent[p] or list(res0.bag) for p in range(seq_len)]
        pos_scores = res0.position_scores
        assert pos_scores is not None  # a positional span result scores every (position, token)
        return [per[p] or torch.topk(pos_scores[p], 3).indices.tolist() for p in range(seq_len)]
    assert res0.token_scores is not None  # span scores every token
    bag = res0.bag or torch.topk(res0.token_scores, max_cands).indices.tolist()
    return [list(bag)] * seq_len


def padding_mask(ids: torch.Tensor, pad: int | None, eos: int | None) -> torch.Tensor:
    """The attention mask a client gives right-padded ``ids`` (batch × L): 0 on each row's trailing run of
    ``pad`` tokens after its first token (the run's first token kept where pad is also EOS: the sentence's
    own end, as :func:`trim_padding` keeps it)."""
    mask = torch.ones_like(ids)
    if pad is None:
        return mask
    for row, seq in zip(mask, ids.tolist()):
        row[1 + len(trim_padding(seq[1:], pad, eos)):] = 0
    return mask


def _layer1_residuals(model: torch.nn.Module, path: str, prefixes: list[list[int]], basis: torch.Tensor,
                      penalty: float, pad: int | None = None, eos: int | None = None) -> torch.Tensor:
    """Residual of each prefix's last layer-1 input (padding masked as the client masks it:
    :func:`padding_mask`); an input that repeats an earlier position of the same prefix (a constant
    prefix under RoPE) is trivially in the span and gets ``penalty``."""
    ids = torch.tensor(prefixes)
    x = capture_inputs(model, ids, [path], padding_mask(ids, pad, eos))[path]
    res = residuals(x[:, -1], basis)
    if x.shape[1] > 1:
        cos = torch.nn.functional.cosine_similarity(x[:, -1:], x[:, :-1], dim=-1).max(dim=1).values
        res = torch.where(cos > 1 - 1e-9, torch.full_like(res, penalty), res)
    return res


def _chained(values: list[float], gap: float) -> float:
    """The largest of ``values`` reachable from the smallest by ascending steps of less than ``gap`` times."""
    ordered = sorted(values)
    top = ordered[0]
    for v in ordered[1:]:
        if v >= gap * max(top, 1e-12):
            break
        top = v
    return top


def greedy_decode(model: torch.nn.Module, path: str, basis: torch.Tensor, cands: list[list[int]], length: int,
                  beams: int, ratio: float = 1e3, tau: float = 0.05, end_ratio: float = 10.0,
                  pad: int | None = None, eos: int | None = None) -> list[tuple[list[int], float]]:
    """Extend prefixes token by token, keeping extensions whose layer-1 input is in the span.

    True extensions sit close to the span and close to each other (residual about 1e-15-1e-12 for a
    float64 gradient, 1e-7 for float32, 1e-4-1e-3 for a float32 SGD delta, growing slowly along the
    sentence); a wrong token sits at 1e-2 or more. So at each position the prefixes' best residuals
    are chained upwards from ``level`` (the largest accepted so far) in steps of less than
    ``end_ratio``; a prefix whose best lies above the chain has reached the end of its sentence's
    visible part (padding and the last token add nothing to the gradient) and ends there. Otherwise
    it keeps the extensions chained from its best one (sentences that branch there), below ``tau`` and
    within ``ratio`` of the best, or else its best one alone: on a noisy update every residual is
    large, nothing ends and the best guess goes on. A prefix whose best extension is the ``pad`` token ends
    after it (a right-padded batch holds nothing but padding past it: padding kept in the loss is in the
    span). Returns the ended prefixes and those that reach ``length``, by mean residual, best first.
    """
    prefixes: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    level = 0.0
    for pos in range(length):
        exts = [(p + [c], s) for p, s in prefixes for c in cands[pos]]
        if not exts:
            break
        res = _layer1_residuals(model, path, [e for e, _ in exts], basis, tau, pad, eos)
        groups = [[j for j, (e, _) in enumerate(exts) if e[:-1] == pre] for pre, _ in prefixes]
        bests = [float(res[idx].min()) for idx in groups]
        top = _chained([level, *bests], end_ratio) if pos else max(bests)
        nxt: list[tuple[list[int], float]] = []
        for (pre, score), idx, best in zip(prefixes, groups, bests):
            if best > top:
                finished.append((pre, score))
                continue
            r = res[idx].tolist()
            near = min(_chained(r, end_ratio), best * ratio)
            keep = [j for j, rv in zip(idx, r) if rv <= max(near, 1e-12) and rv < tau] or [idx[r.index(best)]]
            for j in keep:
                (finished if exts[j][0][-1] == pad else nxt).append((exts[j][0], score + float(res[j])))
        level = max(level, top)
        nxt.sort(key=lambda t: t[1])
        prefixes = nxt[:beams]
        if not prefixes:
            break
    return sorted(finished + prefixes, key=lambda t: t[1] / max(1, len(t[0])))


def _label_params(model: torch.nn.Module, max_elems: int) -> tuple[list[str], list[torch.nn.Parameter]]:
    """Trainable tensors from the output side, up to ``max_elems`` elements (at least one tensor)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    chosen: list[tuple[str, torch.nn.Parameter]] = []
    total = 0
    for n, p in reversed(named):
        if chosen and total + p.numel() > max_elems:
            break
        chosen.append((n, p))
        total += p.numel()
    return [n for n, _ in chosen], [p for _, p in chosen]


def last_tokens(obs: Observation, prefixes: list[list[int]], pad: int | None = None, eos: int | None = None,
                max_elems: int = 200_000, chunk: int = 64, noise_samples: int = 256) -> list[int] | None:
    """The invisible last token of each sequence from the label channel (single-step gradients only).

    Prefixes may differ in length (a padded batch: padding has label -100 and is masked out, so it adds
    nothing). With the prefixes known, the loss is averaged over N = Σ_i len(prefix_i) labels and
    diff = N·(∇θ[known part of the loss] − g_obs) = Σ_i ∇θ logit_{i,last}[y_i] = Σ_i W[y_i]·H_i
    (W: the output embedding, H_i = ∂h_{i,last}/∂θ). Scoring every y needs only u_i = H_i·diff and
    H_i·H_jᵀ (d-dimensional), so it is cheap for any vocabulary size. A prefix that ends in ``pad`` comes
    from a client that keeps the padding in the loss: it is known to the end (padding, masked by
    :func:`padding_mask`, with seq_len − 1 labels), its last token is ``pad`` and it adds only known terms.

    A client that trained with dropout (``obs.dropout`` > 0) computed its known part under masks the server
    does not know, and that noise in diff swamps the label term on a large vocabulary. The server draws
    ``noise_samples`` masks of its own (the public rates: the model in train mode, a fixed seed), takes the
    principal directions of the known part's gradient across them, and matches in their orthogonal
    complement (:func:`fedpeft.attacks.lora_io.dropout_directions`).
    """
    system = _label_system(obs, prefixes, pad, eos, max_elems, chunk, noise_samples)
    if system is None:
        return None
    w, diff, jac_h, complete = system
    matched = iter(_match_labels(w, diff, jac_h) if jac_h else [])
    return [pad if pad is not None and c else next(matched) for c in complete]


def next_tokens(obs: Observation, prefix: list[int], labels: int, k: int, noise_samples: int = 256,
                max_elems: int = 200_000, chunk: int = 64) -> list[int] | None:
    """The ``k`` likeliest tokens after ``prefix`` in a client text of ``labels`` labels, best first, from the
    label channel (:func:`last_tokens`, whose pick is the first): diff = N·∇θ[known part] − labels·g_obs, the
    later labels' terms left in diff as interference. Measured on a GPT-2 over WordPiece with dropout at r = 8,
    the prefix right, one place before the text's last token: the true token ranked 1st on three sentences,
    2nd and 5th on two others, where the last token (the end token) took first place; so a caller verifies a
    short list, not the pick. None where the label channel does not apply."""
    system = _label_system(obs, [prefix], None, None, max_elems, chunk, noise_samples, labels)
    if system is None:
        return None
    w, diff, (jh,), _ = system
    score = ((w @ (jh @ jh.T)) * w).sum(1) - 2 * (w @ (jh @ diff))  # ||diff − W[y]·H||² less ||diff||²
    return torch.topk(-score, min(k, len(score))).indices.tolist()


def _label_system(obs: Observation, prefixes: list[list[int]], pad: int | None, eos: int | None, max_elems: int,
                  chunk: int, noise_samples: int, labels: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[bool]] | None:
    """The label channel's system for :func:`last_tokens` and :func:`next_tokens`: the output embedding W, diff
    and each open sequence's H_i (dropout directions projected out), and which prefixes are complete. None where
    it does not apply (not a one-step gradient of a causal LM, no output embedding, or one with a bias).
    ``labels`` (one sequence): the client's loss had this many labels (default: the prefixes' own)."""
    if obs.kind != "gradient" or obs.task != "causal_lm" or len(prefixes) != obs.batch_size or \
            not all(prefixes):
        return None
    model = obs.working_model()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or getattr(head, "bias", None) is not None:
        return None
    names, params = _label_params(model, max_elems)
    complete = [pad is not None and p[-1] == pad for p in prefixes]
    open_ = [i for i, c in enumerate(complete) if not c]
    n = sum(obs.seq_len - 1 if c else len(p) for p, c in zip(prefixes, complete))  # the batch's labels
    if labels is not None and (len(prefixes) != 1 or labels < n):
        raise ValueError(f"labels={labels} needs one prefix of at most that many labels ({len(prefixes)} prefixes, "
                         f"{n} labels)")

    def known_part() -> torch.Tensor:
        """The loss terms that do not depend on the unknown labels, over the batch's N labels."""
        known = torch.zeros((), dtype=torch.float64)
        for prefix, done in zip(prefixes, complete):  # one sequence at a time: the lengths differ
            ids = torch.tensor([prefix + [pad] * (obs.seq_len - len(prefix))] if done else [prefix])
            logits = model(input_ids=ids, attention_mask=padding_mask(ids, pad, eos)).logits[0]
            logp = torch.log_softmax(logits, -1)
            known = known - logp[:-1].gather(-1, ids[0, 1:, None]).sum()
            if not done:
                known = known + torch.logsumexp(logits[-1], -1)
        return known / n

    hidden: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    try:
        with torch.enable_grad():
            g_known = torch.autograd.grad(known_part(), params, retain_graph=True)
            scale = (labels or n) / n  # the observed update's labels over the known part's
            diff = torch.cat([(gk - scale * obs.update[nm].to(gk.dtype)).flatten()
                              for gk, nm in zip(g_known, names)]) * n
            jac_h = []
            for h in (hidden[i] for i in open_):  # 1 × len_i × d
                d = h.shape[-1]
                rows = []
                for start in range(0, d, chunk):
                    k = min(d, start + chunk) - start
                    out = torch.zeros((k, *h.shape), dtype=h.dtype)
                    out[torch.arange(k), 0, -1, start + torch.arange(k)] = 1.0
                    g = torch.autograd.grad(h, params, grad_outputs=out, retain_graph=True, is_grads_batched=True)
                    rows.append(torch.cat([t.reshape(k, -1) for t in g], 1))
                jac_h.append(torch.cat(rows))  # d × P
    finally:
        handle.remove()
    if obs.dropout > 0 and noise_samples > 1 and open_:
        noise = dropout_directions(model, params, known_part, noise_samples)
        diff = diff - noise @ (noise.T @ diff)
        jac_h = [jh - (jh @ noise) @ noise.T for jh in jac_h]
    return head.weight.detach().to(diff.dtype), diff, jac_h, complete


def _match_labels(w: torch.Tensor, diff: torch.Tensor, jac_h: list[torch.Tensor]) -> list[int]:
    """The labels y_i minimising ||diff − Σ_i W[y_i]·H_i||² (best cosine, then coordinate descent)."""
    b = len(jac_h)
    u = [w @ (jh @ diff) for jh in jac_h]  # vocab: <J_i[y], diff>
    gram = [[jac_h[i] @ jac_h[j].T for j in range(b)] for i in range(b)]
    self_sq = [((w @ gram[i][i]) * w).sum(1) for i in range(b)]  # ||J_i[y]||²
    ys = [int(torch.argmax(u[i] / self_sq[i].clamp_min(1e-300).sqrt())) for i in range(b)]  # best cosine
    for _ in range(3):  # coordinate descent on ||diff − Σ_i J_i[y_i]||²
        for i in range(b):
            cross = sum(w @ (gram[i][j] @ w[ys[j]]) for j in range(b) if j != i)
            ys[i] = int(torch.argmin(self_sq[i] - 2 * (u[i] - cross)))
    return ys


def special_ids(model: torch.nn.Module) -> tuple[int | None, int | None]:
    """The model's public pad and EOS token ids (its config's; None where unset)."""
    cfg = getattr(model, "config", None)
    ids = (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None))
    return tuple(i if isinstance(i, int) else None for i in ids)  # type: ignore[return-value]


def trim_padding(seq: list[int], pad: int | None, eos: int | None) -> list[int]:
    """``seq`` without its trailing ``pad`` tokens (one kept where pad is also EOS: the sentence's own end).
    A client that keeps the padding in the loss makes the first pad visible and labels the last real token
    with it, so the decoder and the label channel add pads after the sentence."""
    end = len(seq)
    while pad is not None and end and seq[end - 1] == pad:
        end -= 1
    return seq[:end + 1] if end < len(seq) and pad == eos else seq[:end]


@register_attack("span_decode")
def run(obs: Observation, beams: int | None = None, max_cands: int = 64, ratio: float = 1e3, tau: float = 0.05,
        end_ratio: float = 10.0, cut: str = "gap", noise_samples: int = 256, **_unused: Any) -> AttackResult:
    """Layer-0 span check, then greedy layer-1 decoding with ``beams`` prefixes (default 2 × batch size);
    the best batch-size sequences are returned, each with its own length, trailing padding trimmed
    (:func:`trim_padding`). ``ratio``, ``tau``, ``end_ratio``: see :func:`greedy_decode`; ``cut``: the
    layer-0 span's bag rule (:func:`fedpeft.attacks.span.run`: "gap", "outlier" or "spectrum");
    ``noise_samples``: dropout masks drawn to denoise the label channel (:func:`last_tokens`)."""
    model = obs.working_model()
    vocab = model.get_input_embeddings().num_embeddings
    groups = shared_groups(model, 1, token_local=False, vocab=vocab)  # cheap checks first: NotApplicable
    if not groups:  # before the span attack's forward pass per vocabulary token
        raise NotApplicable("span_decode needs LoRA modules in the second block")
    group = groups[0]
    if not reads_left_to_right(model, group[0].path, vocab):
        raise NotApplicable("span_decode decodes left to right: the second block's input at a position depends "
                            "on later tokens (a bidirectional encoder such as BERT / MiniLM)")
    _, _, positional = span.first_layer(obs)
    res0 = span.run(obs, cut=cut)
    rows = torch.cat([upd[m.a_name].to(torch.float64) for _, upd in obs.updates() for m in group])
    basis, _ = row_basis(rows, obs.token_bound)
    cands = _candidates(res0, positional, obs.seq_len, max_cands)
    beams = beams or 2 * obs.batch_size
    length = obs.seq_len - 1 if obs.task == "causal_lm" else obs.seq_len  # causal LM: last token invisible
    pad, eos = special_ids(model)
    if pad is not None:  # public; may be invisible at layer 0 (a zero padding_idx embedding) yet in the loss
        cands = [c if pad in c or not pos else [*c, pad] for pos, c in enumerate(cands)]
    decoded = greedy_decode(model, group[0].path, basis, cands, length, beams, ratio, tau, end_ratio, pad, eos)
    seqs = [p for p, _ in decoded][: obs.batch_size]
    tails = last_tokens(obs, seqs, pad, eos, noise_samples=noise_samples) if length < obs.seq_len else None
    if tails is not None:
        seqs = [s + [t] for s, t in zip(seqs, tails)]
    seqs = [trim_padding(s, pad, eos) for s in seqs]
    log.info("span_decode: %d sequences (layer-1 rank %d), last token %s", len(seqs), basis.shape[0],
             "from the label channel" if tails else "unknown")
    return AttackResult("span_decode", token_scores=res0.token_scores, position_scores=res0.position_scores,
                        bag=res0.bag, sequences=seqs,
                        extra={"layer1_rank": basis.shape[0], "scores": [s for _, s in decoded],
                               "last_token": tails is not None, "positions": res0.extra.get("positions", [])})
