"""LoRA-aware aggregation (``federation.lora_aggregation``), Flower-free: the exact weighted mean of the clients'
``B_i A_i``, the error of averaging the factors instead, and the frozen per-module weight correction that makes
``exact`` exact (docs/lora-aggregation.md).

Notation per LoRA module: the global factors ``A`` (r x in) and ``B`` (out x r), client i's update
``dA_i``, ``dB_i`` (deltas against the global factors, as sent) and normalised weights ``w_i``. The client's
product is ``B_i A_i = (B + dB_i)(A + dA_i)``; the weighted mean of the products is
``BA + B·mean(dA) + mean(dB)·A + Σ w_i dB_i dA_i`` and the product of the mean factors differs from it by
``R = Σ w_i dB_i dA_i - mean(dB)·mean(dA)``, which one (out x n·r) @ (n·r x in) product yields. Everything is
in ``B·A`` units: peft's scale ``alpha / r`` is the same on every client, so it cancels in every ratio and is
applied only where a correction is folded into a model's weight.

Mixed ranks (``adapter.client_ranks``): the server's factors have rank ``R = adapter.r``; a client of rank
``r_i <= R`` trains the first ``r_i`` rows of ``A`` and columns of ``B`` (:func:`truncate`, :func:`pad`) at
the common scale ``alpha / R``. Its factors are zero-padded to ``R`` before any mean (HetLoRA), which
leaves its product unchanged, so every mean above holds for mixed ranks too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpeft import lazy
from fedpeft.compression import Layout

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedpeft.models import AdapterState
else:  # torch on first use: checking a configuration imports this module (fedpeft/lazy.py)
    torch = lazy.module("torch")

MODES = ("naive", "exact", "svd", "svd_delta", "freeze_a", "share_a", "zeropad", "stack")
#: the modes that aggregate clients of different LoRA ranks (adapter.client_ranks)
MIXED_RANK_MODES = ("svd", "svd_delta", "zeropad", "stack")
#: federation.lora_rank_weighting: how mixed-rank clients weigh in each rank component (:func:`component_weights`)
RANK_WEIGHTINGS = ("examples", "rank", "slice")
#: the modes that form the mean of the clients' products from their individual updates (aggregators/lora.py)
PRODUCT_MODES = ("exact", "svd", "svd_delta", "zeropad", "stack")
#: the modes whose clients fold a frozen per-module correction into their base weights
CORRECTED = ("exact", "stack")
#: share_a (FedSA-LoRA): LoRA's B is the client's own and never travels
PERSONAL = ".lora_B."
CORRECTION_RANKS = "lora-correction-ranks"  # message record: module -> the rank its correction travels at (0: dense)
RANK_TOL = 1e-12  # correction_wire: singular values below this times the largest are not sent
CORRECTION_FILE = "lora_correction.safetensors"  # exact: module -> C (B·A units) beside the final peft adapter
BASE_WEIGHTS = "_fedpeft_base_weights"  # model attribute: each corrected layer's weight before any correction


def module_of(a_key: str) -> str:
    """The peft LoRA layer a ``lora_A`` parameter belongs to (``x.query.lora_A.default.weight`` -> ``x.query``)."""
    return a_key.split(".lora_A.", 1)[0]


@dataclass
class PairMean:
    """One LoRA module's round, in float64: the weighted mean factor deltas and the exact mean product."""

    mean_da: torch.Tensor
    mean_db: torch.Tensor
    product: torch.Tensor  # Σ w_i B_i A_i
    residual: torch.Tensor  # Σ w_i B_i A_i - (B + mean dB)(A + mean dA)


def pair_mean(ga: torch.Tensor, gb: torch.Tensor, da: list[torch.Tensor], db: list[torch.Tensor],
              w: torch.Tensor) -> PairMean:
    """The round's means for one module from the global factors, the clients' factor deltas and weights: ``w``
    (n,) summing to 1, or per rank component (n x r, :func:`component_weights`), each column summing to 1, or
    to 0 where no client holds that component (the global component is then kept as it is)."""
    a, b = ga.double(), gb.double()
    dA = torch.stack([x.double() for x in da])  # (n, r, in)
    dB = torch.stack([x.double() for x in db])  # (n, out, r)
    n, r, cols = dA.shape
    W = w.view(n, 1).expand(n, r) if w.dim() == 1 else w
    mean_da, mean_db = torch.einsum("nr,nri->ri", W, dA), torch.einsum("nr,nor->or", W, dB)
    cross = (dB * W.view(n, 1, r)).permute(1, 0, 2).reshape(dB.shape[1], n * r) @ dA.reshape(n * r, cols)
    residual = cross - mean_db @ mean_da
    product = b @ a + b @ mean_da + mean_db @ a + cross
    return PairMean(mean_da, mean_db, product, residual)


def normalised(weights: list[float]) -> torch.Tensor:
    """``weights / sum(weights)`` as float64."""
    w = torch.tensor(weights, dtype=torch.float64)
    if not len(weights) or float(w.sum()) <= 0:
        raise ValueError("need at least one update with positive weight")
    return w / w.sum()


def held(ranks: list[int], r: int) -> torch.Tensor:
    """(n x r) float64: 1 where client i (of rank ``ranks[i]``) holds rank component k (``k < r_i``), else 0."""
    return (torch.arange(r).view(1, r) < torch.tensor(ranks).view(-1, 1)).double()


def component_weights(weights: list[float], ranks: list[int], r: int, weighting: str) -> torch.Tensor:
    """(n x r) float64: client i's weight in rank component k of every LoRA module
    (``federation.lora_rank_weighting``). ``examples``: ``w_i`` (the FedAvg weights, normalised) in every
    component, a lower-rank client's zero padding included; ``rank``: ``w_i ∝ weights_i · r_i`` (HetLoRA's
    rank-proportional weights); ``slice``: component k is averaged over the clients that hold it only,
    ``w_i [k < r_i] / Σ_j w_j [k < r_j]`` (a column of zeros where no client holds it: kept unchanged)."""
    if weighting not in RANK_WEIGHTINGS:
        raise ValueError(f"unknown rank weighting {weighting!r}; known: {', '.join(RANK_WEIGHTINGS)}")
    if weighting == "rank":
        w = normalised([x * ri for x, ri in zip(weights, ranks)])
    else:
        w = normalised(weights)
    if weighting != "slice":
        return w.view(-1, 1).expand(len(ranks), r).clone()
    hw = w.view(-1, 1) * held(ranks, r)
    total = hw.sum(0)
    return torch.where(total > 0, hw / total.clamp_min(torch.finfo(torch.float64).tiny), hw)


def pair_means(deltas: list[AdapterState], weights: list[float] | torch.Tensor,
               global_state: AdapterState) -> dict[str, tuple[str, PairMean]]:
    """``A`` key -> (its ``B`` key, :class:`PairMean`) for every LoRA module whose two factors travel; a
    lower-rank client's factor deltas are zero-padded first (:func:`pad_delta`). ``weights``: the clients' raw
    weights, or their normalised per-component weights (:func:`component_weights`)."""
    from fedpeft.models import lora_pairs  # transformers: not when a configuration is checked

    w = weights if isinstance(weights, torch.Tensor) else normalised(weights)
    return {a: (b, pair_mean(global_state[a], global_state[b], [pad_delta(global_state[a], d[a], 0) for d in deltas],
                             [pad_delta(global_state[b], d[b], 1) for d in deltas], w))
            for a, b in lora_pairs(global_state).items()}


def adapter_rank(state: AdapterState) -> int:
    """The LoRA rank of an adapter state or of a client's update (the rows of its ``lora_A`` tensors); 0 when it
    has none."""
    return next((int(v.shape[0]) for k, v in state.items() if ".lora_A." in k), 0)


def pad_delta(factor: torch.Tensor, delta: torch.Tensor, dim: int) -> torch.Tensor:
    """A rank-``r_i`` client's delta of a global ``factor`` (rank along ``dim``: 0 for ``A``, 1 for ``B``) as
    a full-rank delta whose factor is zero beyond ``r_i`` (HetLoRA's zero-padding: ``-factor`` there)."""
    r = delta.shape[dim]
    if r == factor.shape[dim]:
        return delta
    return torch.cat([delta.to(factor.dtype), -factor.narrow(dim, r, factor.shape[dim] - r)], dim=dim)


def _rank_dim(key: str) -> int | None:
    return 0 if ".lora_A." in key else 1 if ".lora_B." in key else None


def truncate(state: AdapterState, r: int) -> AdapterState:
    """``state`` with every LoRA factor cut to its first ``r`` rank components (what a rank-``r`` client holds;
    after an SVD these are the top ``r`` singular directions)."""
    return {k: v if (d := _rank_dim(k)) is None else v.narrow(d, 0, min(r, v.shape[d])).clone()
            for k, v in state.items()}


def pad(state: AdapterState, r: int) -> AdapterState:
    """Inverse of :func:`truncate` on the model: every LoRA factor zero-padded to rank ``r`` (the padded
    components get zero gradients, so training leaves them at zero)."""
    out = {}
    for k, v in state.items():
        d = _rank_dim(k)
        if d is None or v.shape[d] >= r:
            out[k] = v
        else:
            shape = list(v.shape)
            shape[d] = r - v.shape[d]
            out[k] = torch.cat([v, v.new_zeros(shape)], dim=d)
    return out


def client_ranks(client: list[int], rule: str, sizes: list[int]) -> list[int]:
    """The LoRA rank of each partition (``adapter.client_ranks`` under ``adapter.rank_rule``): ``cycle``: partition
    p gets ``client[p % len]``; ``by_size``: partitions sorted by size (ties by id) get the sorted ranks in
    equal shares, the largest partitions the largest ranks."""
    if rule == "cycle":
        return [client[p % len(client)] for p in range(len(sizes))]
    ordered, out = sorted(client), [0] * len(sizes)
    for k, p in enumerate(sorted(range(len(sizes)), key=lambda p: (sizes[p], p))):
        out[p] = ordered[k * len(ordered) // len(sizes)]
    return out


def mixed_ranks(client_ranks: list[int], rule: str) -> bool:
    """Whether clients train at ranks of their own (``adapter.client_ranks``, or node-config ranks)."""
    return bool(client_ranks) or rule == "node"


def pruned_rank(state: AdapterState, r: int, decay: float, threshold: float) -> int:
    """HetLoRA's rank self-pruning: ``k = max(1, floor(decay * r))`` when the trailing components of a rank-``r``
    adapter are small, ``sqrt(Σ_m ||B[:, k:r] A[k:r]||²) < threshold * sqrt(Σ_m ||B[:, :k] A[:k]||²)``, else ``r``
    (a client keeps the rank it can use; a smaller one cuts its bytes and lets the server see it)."""
    from fedpeft.models import lora_pairs

    k = max(1, int(decay * r))
    if k >= r:
        return r
    tail = head = 0.0
    for a_key, b_key in lora_pairs(state).items():
        a, b = state[a_key].double(), state[b_key].double()
        tail += float((b[:, k:r] @ a[k:r]).pow(2).sum())
        head += float((b[:, :k] @ a[:k]).pow(2).sum())
    return k if tail ** 0.5 < threshold * head ** 0.5 else r


def relative_error(errors: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """``sqrt(Σ_m ||E_m||²) / sqrt(Σ_m ||M_m||²)`` over modules m (0 when both are 0): the relative Frobenius
    error of the block-diagonal matrix of all modules."""
    num = sum(float(e.pow(2).sum()) for e in errors) ** 0.5
    den = sum(float(m.pow(2).sum()) for m in references) ** 0.5
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def agg_error(means: dict[str, tuple[str, PairMean]]) -> float | None:
    """``lora_agg_error``: how far ``mean(B_i)·mean(A_i)`` is from ``Σ w_i B_i A_i`` (relative Frobenius error
    summed over modules, :func:`relative_error`); None without LoRA pairs that travel."""
    if not means:
        return None
    return relative_error([m.residual for _, m in means.values()], [m.product for _, m in means.values()])


def correction_shapes(state: AdapterState) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of its weight correction, for every LoRA pair in ``state``."""
    from fedpeft.models import lora_pairs

    return {module_of(a): (int(state[b].shape[0]), int(state[a].shape[1])) for a, b in lora_pairs(state).items()}


def correction_layout(state: AdapterState, ranks: dict[str, int] | None = None) -> Layout:
    """The layout of the per-module correction sent to clients under ``exact`` / ``stack`` (fp32, codec ``none``):
    module m as its dense (out x in) matrix, or with ``ranks[m] = k >= 1`` as its two factors ``m/B`` (out x k)
    and ``m/A`` (k x in) (:func:`correction_wire`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (rows, cols) in correction_shapes(state).items():
        k = (ranks or {}).get(name, 0)
        shapes.update({f"{name}/B": (rows, k), f"{name}/A": (k, cols)} if k else {name: (rows, cols)})
    return Layout.from_state({k: torch.empty(s) for k, s in shapes.items()})


def correction_wire(correction: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """What travels of each module's correction ``C`` (float64) and its rank record: the SVD factors of its
    numerical rank k (singular values above ``RANK_TOL`` times the largest), ``B = U_k S_k^½``, ``A = S_k^½ V_k^T``
    in fp32, when those ``(out + in) · k`` numbers are fewer than the ``out · in`` of ``C`` (rank 0: ``C`` dense).
    The components dropped are below fp32's own rounding of ``C``, so both forms are as exact as fp32 allows;
    ``stack``'s correction has rank at most the ranks stacked so far, so it travels as factors while that is small."""
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, c in sorted(correction.items()):
        rows, cols = c.shape
        u, s, vh = torch.linalg.svd(c.double(), full_matrices=False)
        k = max(1, int((s > s[0] * RANK_TOL).sum())) if s.numel() else 1
        if (rows + cols) * k < rows * cols:
            root = s[:k].sqrt()
            out[f"{name}/B"], out[f"{name}/A"] = (u[:, :k] * root).float(), (root.unsqueeze(1) * vh[:k]).float()
            ranks[name] = k
        else:
            out[name], ranks[name] = c.float(), 0
    return out, ranks


def correction_from_wire(decoded: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`correction_wire` on a decoded payload: module -> C (fp32)."""
    return {name: decoded[f"{name}/B"] @ decoded[f"{name}/A"] if k else decoded[name] for name, k in ranks.items()}


def set_correction(model: nn.Module, correction: dict[str, torch.Tensor]) -> None:
    """Make each named LoRA layer's frozen base weight ``W0 + scale * C`` (``W0``: its weight before the
    first correction, kept on the model; ``scale``: peft's ``alpha / r``). Idempotent: a later call replaces,
    not adds to, the correction; a layer absent from ``correction`` gets none."""
    saved: dict[str, torch.Tensor] = model.__dict__.setdefault(BASE_WEIGHTS, {})
    for name in set(saved) | set(correction):
        layer: Any = model.get_submodule(name)  # a peft LoRA layer
        weight = layer.get_base_layer().weight
        w0 = saved.setdefault(name, weight.detach().clone())
        c = correction.get(name)
        with torch.no_grad():
            if c is None:
                weight.copy_(w0)
                continue
            c = c.T if getattr(layer, "fan_in_fan_out", False) else c
            adapter = layer.active_adapters[0]
            weight.copy_(w0 + float(layer.scaling[adapter]) * c.to(w0.device, w0.dtype))
