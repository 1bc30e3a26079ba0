"""Shared machinery for the span attacks: find LoRA layers, capture the inputs they read for chosen
token sequences (forward hooks with an early exit), and project candidates onto a row space.

Everything is architecture-agnostic: which LoRA modules read the same, token-local input is found by
probing the model, not from module names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
_LAYER = re.compile(r"\.(\d+)\.")


class _Stop(Exception):
    """Raised by a hook once every wanted input is captured (skip the rest of the forward pass)."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear map: its module path, layer index and adapter-state parameter names."""

    path: str
    layer: int
    a_name: str
    b_name: str


def lora_modules(model: nn.Module, frozen_a: bool = False) -> list[LoraModule]:
    """All LoRA A/B pairs of ``model`` (names as in :func:`fedpeft.models.adapter_state`), in order: both
    factors trainable, or with ``frozen_a`` those whose ``B`` alone trains (FFA-LoRA: ``A`` is the public
    seeded init, in the model itself, never in an update)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    found = []
    for name, _ in model.named_modules():
        if ".lora_A." not in name + "." or not name.split(".")[-2] == "lora_A":
            continue
        a_name = f"{name}.weight"
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        if (a_name not in trainable) == frozen_a and b_name in trainable:
            m = _LAYER.search(name)
            found.append(LoraModule(name.rsplit(".lora_A.", 1)[0], int(m.group(1)) if m else -1, a_name, b_name))
    return found


def _input_ids_kwargs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, paths: list[str],
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The inputs (batch × seq × d_in) that the lora_A maps under ``paths`` read for token ids ``ids``
    (attention ``mask``: 0 on padding; default all ones)."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(path: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            got[path] = args[0].detach().clone()
            if len(got) == len(paths):
                raise _Stop

        return hook

    for p in paths:
        lora_a = modules[f"{p}.lora_A"]
        target = next(iter(lora_a.values())) if isinstance(lora_a, nn.ModuleDict) else lora_a
        handles.append(target.register_forward_pre_hook(hook_for(p)))
    try:
        model(**_input_ids_kwargs(model, ids, mask))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in paths if p not in got]
    if missing:
        raise RuntimeError(f"no input captured for {missing}")
    return got


def shared_groups(model: nn.Module, layer: int, token_local: bool, vocab: int,
                  frozen_a: bool = False) -> list[list[LoraModule]]:
    """LoRA modules of ``layer`` grouped by identical input (e.g. q/k/v), largest group first.

    With ``token_local`` only modules whose input at a position depends on that position's token
    alone are kept (the first block's normed embeddings, not attention outputs). ``frozen_a``: the modules
    whose ``A`` is frozen (:func:`lora_modules`).
    """
    mods = [m for m in lora_modules(model, frozen_a) if m.layer == layer]
    if not mods:
        return []
    g = torch.Generator().manual_seed(1)
    probe = torch.randint(5, vocab, (2, 6), generator=g)
    probe[1, 3] = probe[0, 3]
    inputs = capture_inputs(model, probe, [m.path for m in mods])
    groups: list[list[LoraModule]] = []
    for m in mods:
        x = inputs[m.path]
        if token_local and not torch.allclose(x[0, 3], x[1, 3], rtol=1e-5, atol=1e-6):
            continue
        for grp in groups:
            y = inputs[grp[0].path]
            if y.shape == x.shape and torch.allclose(x, y, rtol=1e-6, atol=1e-7):
                grp.append(m)
                break
        else:
            groups.append([m])
    return sorted(groups, key=len, reverse=True)


def reads_left_to_right(model: nn.Module, path: str, vocab: int) -> bool:
    """Whether the input of the LoRA module at ``path`` at a position ignores the later tokens (causal
    attention), probed by changing the last token of a sequence: False for bidirectional encoders (BERT)."""
    g = torch.Generator().manual_seed(2)
    probe = torch.randint(5, vocab, (2, 6), generator=g)
    probe[1, :-1] = probe[0, :-1]
    probe[1, -1] = 5 + (int(probe[0, -1]) - 4) % (vocab - 5)  # another token at the last position only
    x = capture_inputs(model, probe, [path])[path]
    return torch.allclose(x[0, :-1], x[1, :-1], rtol=1e-6, atol=1e-7)


@torch.no_grad()
def token_inputs(model: nn.Module, path: str, vocab: int, seq_len: int,
                 chunk: int = 512) -> tuple[torch.Tensor, bool]:
    """Candidate first-layer inputs for every (token, position): (positions × vocab × d).

    Returns a single position when the inputs do not depend on the position (RoPE models).
    """
    probe = torch.tensor([[7] * min(seq_len, 4)])
    x = capture_inputs(model, probe, [path])[path][0]
    positional = not torch.allclose(x[0], x[-1], rtol=1e-6, atol=1e-7)
    length = seq_len if positional else 1
    out: torch.Tensor | None = None  # filled in place: one copy of positions x vocab x d, not three
    per = max(1, chunk // length)
    for start in range(0, vocab, per):
        ids = torch.arange(start, min(vocab, start + per)).unsqueeze(1).repeat(1, length)
        x = capture_inputs(model, ids, [path])[path]  # tokens x positions x d
        if out is None:
            out = x.new_empty((length, vocab, x.shape[-1]))
        out[:, start:start + x.shape[0]] = x.transpose(0, 1)
    assert out is not None  # vocab >= 1
    return out, positional


ROW_CHUNK = 1 << 16  # rows of a candidate table handled at once in float64 (64k x d=384: 200 MB)


def by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to the rows of ``x`` (… × d) a chunk at a time, results joined back in ``x``'s leading
    shape: a row-wise float64 computation on a whole positions x vocab x d table (gigabytes for a model with
    learned positions and a large vocabulary) never holds more than one chunk's temporaries."""
    lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
    parts = [fn(flat[i:i + ROW_CHUNK]) for i in range(0, flat.shape[0], ROW_CHUNK)]
    out = torch.cat(parts) if parts else fn(flat)
    return out.reshape(*lead, *out.shape[1:])


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """The float64 mean of the rows of ``x`` (… × d), summed a chunk at a time (see :func:`by_rows`)."""
    flat = x.reshape(-1, x.shape[-1])
    total = flat.new_zeros(flat.shape[-1], dtype=torch.float64)
    for i in range(0, flat.shape[0], ROW_CHUNK):
        total += flat[i:i + ROW_CHUNK].to(torch.float64).sum(0)
    return total / max(1, flat.shape[0])


def noise_floor_rank(s: torch.Tensor, ratio: float = 10.0, level: float = 1e-3) -> int:
    """The rank above a noise floor in the singular values ``s`` (descending): the last drop of at least
    ``ratio`` times between neighbours that lands below ``level``·s_max, else all of ``s``.

    More rows than the inputs they combine (several rounds stacked, or modules × rank above the batch's
    tokens) leave rows − tokens directions of pure rounding noise (a float32 SGD delta: about 1e-5 of
    s_max, measured), which would otherwise enter the basis and bring every candidate close to the span.
    A smooth spectrum (rows below the tokens: measured neighbour ratios under 8) keeps every row.
    """
    if s.numel() < 2:
        return int(s.numel())
    drops = (s[:-1] / s[1:].clamp_min(1e-300) >= ratio) & (s[1:] < level * s[0])
    hits = drops.nonzero().flatten()
    return int(hits[-1]) + 1 if hits.numel() else int(s.numel())


def signal_rank(s: torch.Tensor, d: int) -> int:
    """How many of the singular values ``s`` (descending) of rows × ``d`` stand above a white-noise bulk, for a
    spectrum whose true tail runs smoothly into the noise (no drop for :func:`noise_floor_rank` to find).

    m inputs take the top m directions; the other rows − m carry rounding noise (a float32 SGD delta at a small
    learning rate, a pretrained model's least-weighted tokens) spread like a (rows − m) × (d − m) Gaussian
    matrix, whose singular values fill [σ(√(d−m) − √(rows−m)), σ(√(d−m) + √(rows−m))] (Marchenko-Pastur). The
    smallest singular value sits at the lower edge; m is the fixed point of "the values above the upper edge
    implied by m", iterated up from 0 (the widest edge). All rows when rows >= d (no lower edge)."""
    n = int(s.numel())
    if n < 2 or n >= d:
        return n
    m = 0
    for _ in range(n):
        wide, tall = (d - m) ** 0.5, (n - m) ** 0.5
        found = int((s > s[-1] * (wide + tall) / (wide - tall)).sum())
        if found == m:
            break
        m = found
    return m


def count_cut(values: torch.Tensor, count: int) -> float:
    """Threshold that accepts the ``count`` smallest of ``values`` (geometric mean of the count-th and the next)."""
    v = torch.sort(values.flatten().to(torch.float64)).values.clamp_min(1e-300)
    if count <= 0:
        return 0.0
    if count >= v.numel():
        return float(v[-1]) * 2.0
    return float(torch.sqrt(v[count - 1] * v[count]))


def row_basis(rows: torch.Tensor, bound: int, rel_floor: float = 1e-13) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis (k × d) of the row space of ``rows`` (float64 SVD) and all singular values.

    k = min(bound, #rows, d − 1, #singular values above ``rel_floor``·s_max, :func:`noise_floor_rank`):
    the rank comes from the token-count bound and a clear noise floor, not from a relative tolerance (the
    true spectrum spans many decades).
    """
    m = rows.to(torch.float64)
    if m.numel() == 0 or float(m.abs().max()) == 0.0:
        return m.new_zeros((0, m.shape[-1])), m.new_zeros(0)
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    numeric = int((s > s[0] * rel_floor).sum())
    k = max(0, min(bound, vh.shape[0], m.shape[1] - 1, numeric, noise_floor_rank(s)))
    return vh[:k], s


def residuals(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Normalised distance of each row of ``x`` (… × d) from span(basis): 0 = inside, 1 = orthogonal."""
    if basis.shape[0] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.float64)

    def rows(c: torch.Tensor) -> torch.Tensor:  # (n x d) -> (n x 2): ‖x‖, ‖x - proj‖
        c = c.to(torch.float64)
        return torch.stack([c.norm(dim=-1), (c - (c @ basis.T) @ basis).norm(dim=-1)], dim=-1)
    both = by_rows(rows, x)
    norm, dist = both[..., 0], both[..., 1]
    res = dist / norm.clamp_min(1e-300)
    return torch.where(norm > 1e-12 * float(norm.max()), res, torch.ones_like(res))  # zero inputs (padding rows)


def gap_cut(values: torch.Tensor, bound: int, min_ratio: float = 10.0) -> float:
    """Threshold at the largest multiplicative gap among the ``bound``+1 smallest values.

    Returns 0.0 (select nothing) when no gap reaches ``min_ratio`` (no clear separation).
    """
    v = torch.sort(values.flatten().to(torch.float64)).values[: bound + 1].clamp_min(1e-300)
    if v.numel() < 2:
        return 0.0
    ratios = v[1:] / v[:-1]
    i = int(torch.argmax(ratios))
    if float(ratios[i]) < min_ratio:
        return 0.0
    return float(torch.sqrt(v[i] * v[i + 1]))


def outlier_cut(values: torch.Tensor, z: float = 5.0) -> float:
    """Threshold ``z`` robust standard deviations (1.4826 × the median absolute deviation) below the median
    of ``values``: the residuals of the batch's inputs stand out of the vocabulary's bulk even when the
    rows are fewer than the inputs (no gap). A Gaussian bulk passes about vocab × Φ(−z) non-members
    (0.01 of 30,522 at z = 5)."""
    v = values.flatten().to(torch.float64)
    med = v.median()
    return float(med - z * 1.4826 * (v - med).abs().median())


def dropout_gradients(model: nn.Module, params: list[nn.Parameter], loss: Callable[[], torch.Tensor],
                      samples: int, seed: int = 0) -> torch.Tensor:
    """∇θ ``loss()`` (flattened over ``params``) under ``samples`` dropout masks, one row each (samples × P): the
    model in train mode (its public dropout rates), masks from ``seed``, the caller's random state untouched."""
    was_training = model.training
    grads = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        try:
            with torch.enable_grad():
                for _ in range(samples):
                    grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss(), params)]))
        finally:
            model.train(was_training)
    return torch.stack(grads)


def dropout_directions(model: nn.Module, params: list[nn.Parameter], loss: Callable[[], torch.Tensor],
                       samples: int, seed: int = 0) -> torch.Tensor:
    """Orthonormal principal directions (P × k) of ∇θ ``loss()`` across ``samples`` dropout masks
    (:func:`dropout_gradients`). A client's dropout noise lies mostly along these directions: compared in their
    orthogonal complement, a gradient computed without the client's masks matches the client's (measured on
    2-layer GPT-2s over a 30,522-token vocabulary with dropout 0.1, docs/audit.md: the label channel's true last
    token ranked first in 16 of 16 cases against ranks up to 803 without; 64 masks were too few)."""
    stacked = dropout_gradients(model, params, loss, samples, seed)
    centred = stacked - stacked.mean(0)
    u, s, _ = torch.linalg.svd(centred.T, full_matrices=False)
    return u[:, s > s[0] * 1e-9] if s[0] > 0 else u[:, :0]
