"""Split examples: the held-out eval set and the clients' shares (pure numpy, seeded).

:func:`split_eval` holds out a stratified fraction; duplicate examples stay on one side.
:func:`partition`: every scheme returns ``num_clients`` sorted ``int64`` index arrays that are disjoint, cover every
example and are each non-empty. Nothing here depends on the simulation engine, so the in-process
and Ray engines (and a real deployment given the same config + seed) see the same client data.

Schemes (``data.partition``):

- ``iid``: a seeded permutation cut into near-equal parts.
- ``dirichlet``: label skew. For each class, client shares are drawn from Dirichlet(alpha) and the
  class's (shuffled) examples are cut by the cumulative shares. If a draw leaves a client empty it is
  redrawn (up to ``MAX_TRIES`` draws from the same generator, so still deterministic); if every draw
  fails, empty clients each take one random example from the currently largest client.
- ``natural``: by the group column. Distinct groups are shuffled and dealt round-robin to clients
  (several groups per client when there are more groups than clients; never a split group).
- ``quantity``: size skew. Client sizes are ``1 + Multinomial(n - k, Dirichlet(quantity_alpha))``.
- ``pathological``: each client holds ``classes_per_client`` classes, taken as consecutive windows of
  a shuffled class cycle (so every class is held by someone); each class's examples are dealt in
  equal shards to its holders. Needs ``num_clients * classes_per_client >= number of classes``.

For ``causal_lm`` data (no labels) the label-based schemes use the group column (e.g. the
chatterbot category) as the class variable.

``flwr_iid``, ``flwr_dirichlet`` and ``flwr_pathological`` hand the split to Flower Datasets' own
partitioners (``IidPartitioner``, ``DirichletPartitioner``, ``PathologicalPartitioner``; the package
``flwr-datasets`` is imported only then), so client data can be matched with Flower baselines. Their
parameters come from the same keys (``dirichlet_alpha``, ``classes_per_client``), their seed from the run
seed; Flower's pathological split may leave examples of unassigned classes out (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fedpeft.errors import DataError
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import DataSection
    from fedpeft.data import Examples

logger = logging.getLogger(__name__)

MAX_TRIES = 100
# A scheme: (examples, data section, seeded generator) -> num_clients index arrays (sorted by the caller).
Scheme = Callable[["Examples", "DataSection", np.random.Generator], list[np.ndarray]]
PARTITIONS: Registry[Scheme] = Registry("partition scheme")


def partition(ex: Examples, cfg: DataSection, seed: int) -> list[np.ndarray]:
    """Split ``ex`` into ``cfg.num_clients`` disjoint, covering, sorted int64 index arrays."""
    n, k = len(ex), cfg.num_clients
    if k > n:
        raise DataError(f"data.num_clients = {k} exceeds the {n} training examples; "
                        "lower num_clients or use more data")
    parts = PARTITIONS.get(cfg.partition)(ex, cfg, np.random.default_rng(seed))
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    logger.info("partition %s over %d clients: sizes %s", cfg.partition, k, [len(p) for p in out])
    return out


def split_eval(ex: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Deterministic (train, held_out) split with about ``fraction`` held out.

    Stratified by label (classification) or by group (causal_lm with groups). Exact duplicate
    examples always land on the same side, so the held-out set never contains a training example.
    ``train`` keeps the source order; ``held_out`` comes in a seeded random order.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"eval fraction must be in (0, 1), got {fraction}")
    if len(ex) < 2:
        raise DataError(f"need at least 2 examples to hold some out for evaluation, got {len(ex)}")
    keys = ex.texts if ex.task == "classification" else [
        p + "\x00" + r for p, r in zip(ex.prompts, ex.responses)]
    first: dict[str, int] = {}
    rep = np.asarray([first.setdefault(key, i) for i, key in enumerate(keys)], dtype=np.int64)
    uniq = np.flatnonzero(rep == np.arange(len(ex)))  # first occurrence of each distinct example
    strata = _class_ids(ex, None)
    rng = np.random.default_rng(seed)
    held = [np.empty(0, dtype=np.int64)]
    for s in np.unique(strata[uniq]):
        members = rng.permutation(uniq[strata[uniq] == s])
        held.append(members[: int(round(fraction * len(members)))])
    held_reps = np.concatenate(held)
    if len(held_reps) == 0:
        held_reps = rng.permutation(uniq)[:1]
    if len(held_reps) == len(uniq):
        held_reps = held_reps[:-1]
    if len(held_reps) == 0:
        raise DataError("all examples are copies of one example; nothing to hold out for evaluation")
    is_held = np.isin(rep, held_reps)
    # train keeps the source order (partition indexes into it); held_out is shuffled so that any
    # prefix of it (e.g. a max_eval_examples cap) is a fair sample rather than the first labels
    return ex.subset(np.flatnonzero(~is_held)), ex.subset(rng.permutation(np.flatnonzero(is_held)))


def _class_ids(ex: Examples, scheme: str | None) -> np.ndarray:
    """Labels for classification; group ids for prompt/response data (which has no labels).

    Without either: one class for ``scheme=None`` (the eval split), else a DataError."""
    if ex.task == "classification":
        return np.asarray(ex.labels, dtype=np.int64)
    if ex.groups is None:
        if scheme is None:
            return np.zeros(len(ex), dtype=np.int64)
        raise DataError(f"data.partition = {scheme!r} needs labels or a group column; "
                        f"{ex.task} data without data.group_column can use 'iid' or 'quantity'")
    _, inv = np.unique(np.asarray(ex.groups, dtype=object).astype(str), return_inverse=True)
    return inv.astype(np.int64)


def _fill_empty(parts: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Give each empty client one random example from the currently largest client."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for j in range(len(parts)):
        if len(parts[j]) == 0:
            big = int(np.argmax([len(p) for p in parts]))
            pick = int(rng.integers(len(parts[big])))
            parts[j] = parts[big][pick:pick + 1].copy()
            parts[big] = np.delete(parts[big], pick)
    return parts


@PARTITIONS.register("iid")
def _iid(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(ex)), cfg.num_clients)


@PARTITIONS.register("dirichlet")
def _dirichlet(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    labels, k, alpha = _class_ids(ex, "dirichlet"), cfg.num_clients, cfg.dirichlet_alpha
    classes = np.unique(labels)
    parts: list[np.ndarray] = []
    for _ in range(MAX_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for j, chunk in enumerate(np.split(idx, cuts)):
                buckets[j].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) > 0:
            return parts
    logger.warning("dirichlet(alpha=%g): a client stayed empty after %d draws; moving examples "
                   "from the largest client", alpha, MAX_TRIES)
    return _fill_empty(parts, rng)


@PARTITIONS.register("natural")
def _natural(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    if ex.groups is None:
        raise DataError("data.partition = 'natural' needs a group column, but these examples have "
                        "none (set data.group_column to a column of the file; chatterbot uses its "
                        "category; bbc_news has no groups)")
    k = cfg.num_clients
    names, inv = np.unique(np.asarray(ex.groups, dtype=object).astype(str), return_inverse=True)
    if len(names) < k:
        raise DataError(f"data.partition = 'natural': only {len(names)} distinct groups "
                        f"({', '.join(map(str, names[:10]))}) for data.num_clients = {k}; "
                        "lower num_clients or choose another partition")
    order = rng.permutation(len(names))
    client_of_group = np.empty(len(names), dtype=np.int64)
    client_of_group[order] = np.arange(len(names)) % k
    owner = client_of_group[inv]
    return [np.flatnonzero(owner == j) for j in range(k)]


@PARTITIONS.register("quantity")
def _quantity(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    n, k = len(ex), cfg.num_clients
    shares = rng.dirichlet(np.full(k, cfg.quantity_alpha))
    sizes = 1 + rng.multinomial(n - k, shares)
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


@PARTITIONS.register("pathological")
def _pathological(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    labels, k, per_client = _class_ids(ex, "pathological"), cfg.num_clients, cfg.classes_per_client
    classes = np.unique(labels)
    c = len(classes)
    if per_client > c:
        logger.warning("classes_per_client = %d exceeds the %d classes; using %d", per_client, c, c)
        per_client = c
    if k * per_client < c:
        raise DataError(f"data.partition = 'pathological': {k} clients x {per_client} classes per "
                        f"client cannot cover all {c} classes; raise data.classes_per_client to "
                        f"{-(-c // k)} or data.num_clients to {-(-c // per_client)}")
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(cl): [] for cl in classes}
    for j in range(k):
        for t in range(per_client):
            holders[int(order[(j * per_client + t) % c])].append(j)
    buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
    for cl, who in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == cl))
        for j, shard in zip(who, np.array_split(idx, len(who))):
            buckets[j].append(shard)
    parts = [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in buckets]
    return _fill_empty(parts, rng)


def _flower(name: str, ex: Examples, cfg: DataSection, rng: np.random.Generator, **kwargs: object) -> list[np.ndarray]:
    """Split with Flower Datasets' ``name`` partitioner over the class ids (or, for flwr_iid, the positions)."""
    try:
        import datasets
        from flwr_datasets import partitioner
    except ImportError:
        raise DataError(f"data.partition = {cfg.partition!r} needs the flwr-datasets package "
                        "(pip install flwr-datasets; see docs/flower.md)") from None
    if name == "IidPartitioner":  # Flower's IID split cuts the table in order: shuffle it first (seeded)
        table = datasets.Dataset.from_dict({"idx": rng.permutation(len(ex)).tolist()})
    else:
        table = datasets.Dataset.from_dict({"label": _class_ids(ex, cfg.partition).tolist(),
                                            "idx": list(range(len(ex)))})
        kwargs.update(partition_by="label", seed=int(rng.integers(2**31 - 1)))
    split = getattr(partitioner, name)(num_partitions=cfg.num_clients, **kwargs)
    split.dataset = table
    try:
        parts = [np.asarray(split.load_partition(j)["idx"], dtype=np.int64) for j in range(cfg.num_clients)]
    except ValueError as e:
        raise DataError(f"data.partition = {cfg.partition!r}: {e}") from None
    left_out = len(ex) - sum(len(p) for p in parts)
    if left_out:
        logger.warning("%s left %d of %d examples out of every client", name, left_out, len(ex))
    return _fill_empty(parts, rng)


@PARTITIONS.register("flwr_iid")
def _flwr_iid(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    return _flower("IidPartitioner", ex, cfg, rng)


@PARTITIONS.register("flwr_dirichlet")
def _flwr_dirichlet(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    return _flower("DirichletPartitioner", ex, cfg, rng, alpha=cfg.dirichlet_alpha,
                   min_partition_size=min(10, len(ex) // cfg.num_clients))


@PARTITIONS.register("flwr_pathological")
def _flwr_pathological(ex: Examples, cfg: DataSection, rng: np.random.Generator) -> list[np.ndarray]:
    return _flower("PathologicalPartitioner", ex, cfg, rng, num_classes_per_partition=cfg.classes_per_client)


def client_eval_split(indices: np.ndarray, fraction: float, seed: int, partition_id: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One client's (train, held_out) index arrays: a seeded ``fraction`` of ``indices`` held out for federated
    evaluation, at least one example on each side when the client has two or more (none held out otherwise).
    ``train`` keeps the partition's order, so a fraction of 0 changes nothing."""
    indices = np.asarray(indices, dtype=np.int64)
    n_eval = min(max(1, round(fraction * len(indices))), len(indices) - 1) if fraction > 0 else 0
    order = np.random.default_rng([seed, partition_id]).permutation(len(indices))
    held = np.sort(order[:max(0, n_eval)])
    keep = np.setdiff1d(np.arange(len(indices)), held)
    return indices[keep], indices[held]
