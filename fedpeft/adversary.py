"""The adversary harness: simulated hostile clients, to measure what the server's defences hold off.

Simulation only (``[adversary]``, docs/adversary.md; :func:`require_simulation` refuses it in a deployment).
Which clients attack is drawn once from ``run.seed`` (:func:`adversarial_clients`); the ClientApp computes it
to act, the server only to record ground truth (nothing aggregates by it). An attack is an :class:`Attack`
with one hook into the client pipeline:

- model poisoning (:meth:`Attack.update`) changes the delta before error feedback, clipping and encoding, so
  it works with every codec: ``scale``, ``sign_flip``, ``gaussian_noise``, ``adaptive``;
- data poisoning (:meth:`Attack.data`) changes the local tokenized examples: ``label_flip``, ``backdoor``;
- ``weight_inflation`` (:meth:`Attack.metrics`) changes the reported ``num-examples``.

:class:`Ledger` is the server's side: per round, which valid replies came from attackers and their share of
the aggregation weight, every dropped or down-weighted update (``metrics.jsonl``), and the backdoor success
rate beside the clean evaluation (``summary.md``). Flower-free.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from fedpeft import lazy
from fedpeft.config import Config
from fedpeft.errors import ConfigError, DataError
from fedpeft.registry import Registry

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from fedpeft import data, training
    from fedpeft.data import TokenizedDataset
    from fedpeft.runtime import Runtime
    from fedpeft.server.replies import RoundReplies
else:  # `fedpeft config` reads ATTACKS' names without torch (fedpeft/lazy.py)
    np = lazy.module("numpy")
    torch = lazy.module("torch")
    data = lazy.module("fedpeft.data")
    training = lazy.module("fedpeft.training")

State = dict[str, "torch.Tensor"]
SALT = 0xAD7E  # keeps the harness's draws apart from the other streams seeded by run.seed


class Attack:
    """An honest client: every hook returns its input. A registered attack overrides one hook.

    ``keys`` names the ``[adversary]`` settings the attack reads (shown in ``summary.md``).
    """

    keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.adv = cfg.adversary

    def data(self, dataset: Dataset, rt: Runtime, partition_id: int) -> Dataset:
        """The local training data (data poisoning)."""
        return dataset

    def update(self, delta: State, seed: int) -> State:
        """The delta handed to the update pipeline (model poisoning); ``seed`` is the client's round seed."""
        return delta

    def metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics sent with the update."""
        return metrics


ATTACKS: Registry[type[Attack]] = Registry("adversary attack")


def adversarial_clients(cfg: Config) -> list[int]:
    """The attacking partition ids, sorted: ``adversary.clients``, or ``round(fraction x num_clients)`` (at
    least one) drawn from ``run.seed``. Every process computes the same list."""
    adv, n = cfg.adversary, cfg.data.num_clients
    if adv.attack == "none":
        return []
    if adv.clients:
        return sorted(adv.clients)
    k = min(n, max(1, round(adv.fraction * n)))
    return sorted(int(i) for i in np.random.default_rng([cfg.run.seed, SALT]).choice(n, size=k, replace=False))


def require_simulation(cfg: Config, simulation: bool) -> None:
    """Refuse the harness outside a simulation (a real deployment must never run planted attackers)."""
    if cfg.adversary.attack != "none" and not simulation:
        raise ConfigError(f"adversary.attack = {cfg.adversary.attack!r}: the [adversary] harness runs only in a "
                          "simulation (fedpeft simulate, engines inprocess / ray), not in a deployment; remove the "
                          "[adversary] section")


def attack_for(cfg: Config, partition_id: int, simulation: bool) -> Attack:
    """What the client holding ``partition_id`` does: its attack, or the honest no-op :class:`Attack`."""
    require_simulation(cfg, simulation)
    if partition_id not in adversarial_clients(cfg):
        return Attack(cfg)
    return ATTACKS.get(cfg.adversary.attack)(cfg)


def update_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update (all tensors as one vector)."""
    total = torch.zeros((), dtype=torch.float64)
    for v in state.values():
        total += v.double().pow(2).sum()
    return float(total.sqrt())


# ---------------------------------------------------------------------------------------- model poisoning

@ATTACKS.register("scale")
class Scale(Attack):
    """The update times ``factor`` (x10, x100: poison by norm)."""

    keys = ("factor",)

    def update(self, delta: State, seed: int) -> State:
        return {k: v * self.adv.factor for k, v in delta.items()}


@ATTACKS.register("sign_flip")
class SignFlip(Attack):
    """The negated update: pushes the global adapter against the honest direction."""

    def update(self, delta: State, seed: int) -> State:
        return {k: -v for k, v in delta.items()}


@ATTACKS.register("gaussian_noise")
class GaussianNoise(Attack):
    """N(0, noise_std^2) noise in place of the update (Blanchard et al.'s Gaussian Byzantine client)."""

    keys = ("noise_std",)

    def update(self, delta: State, seed: int) -> State:
        g = torch.Generator().manual_seed((seed + SALT) % 2**63)
        return {k: (torch.randn(v.shape, generator=g, dtype=torch.float64) * self.adv.noise_std).to(v.dtype)
                for k, v in delta.items()}


@ATTACKS.register("adaptive")
class Adaptive(Attack):
    """The reversed update rescaled to ``adaptive_margin`` x a norm bound: as harmful as a norm check lets
    through. The bound is ``adaptive_norm``, else the server's own sanity bound as the attacker can estimate
    it: the median multiple (``adaptive_multiple``, by default ``sanity.norm_multiple``) x its own honest
    update norm (a stand-in for the round's median), capped at ``sanity.max_update_norm``."""

    keys = ("adaptive_norm", "adaptive_multiple", "adaptive_margin")

    def bound(self, honest_norm: float) -> float:
        """The norm bound this attacker targets (config_rules refuses a configuration without any)."""
        if self.adv.adaptive_norm:
            return self.adv.adaptive_norm
        multiple, cap = self.adv.adaptive_multiple or self.cfg.sanity.norm_multiple, self.cfg.sanity.max_update_norm
        return min(([multiple * honest_norm] if multiple else []) + ([cap] if cap > 0 else []))

    def update(self, delta: State, seed: int) -> State:
        norm = update_norm(delta)
        if norm == 0.0:
            return delta
        s = -self.adv.adaptive_margin * self.bound(norm) / norm
        return {k: v * s for k, v in delta.items()}


# ---------------------------------------------------------------------------------------- weight inflation

@ATTACKS.register("weight_inflation")
class WeightInflation(Attack):
    """Claims ``claimed_examples`` training examples, for a FedAvg weight it does not have."""

    keys = ("claimed_examples",)

    def metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {**metrics, "num-examples": float(self.adv.claimed_examples)}


# ---------------------------------------------------------------------------------------- data poisoning

def _tokenized(dataset: Dataset) -> TokenizedDataset:
    if not isinstance(dataset, data.TokenizedDataset) or dataset.task != "classification":
        raise DataError("data poisoning needs tokenized classification examples")
    return dataset


def num_labels(rt: Runtime) -> int:
    """The number of classes, after checking ``adversary.target_label`` is one of them."""
    names = list(rt.examples.label_names)
    if not 0 <= rt.cfg.adversary.target_label < len(names):
        raise ConfigError(f"adversary.target_label = {rt.cfg.adversary.target_label} is not a label id of this "
                          f"data: 0..{len(names) - 1} ({', '.join(map(str, names))})")
    return len(names)


def flip_labels(labels: Sequence[int], classes: int, rule: str) -> list[int]:
    """``rotate``: y -> (y + 1) mod C; ``reverse``: y -> C - 1 - y."""
    if rule == "reverse":
        return [classes - 1 - int(y) for y in labels]
    return [(int(y) + 1) % classes for y in labels]


def insert_trigger(ids: Sequence[int], trigger: Sequence[int], max_length: int, specials: Collection[int]) -> list[int]:
    """``trigger`` inserted after the leading special token ([CLS], <s>) if any, else first; cut back to
    ``max_length`` from the end, keeping a trailing special token ([SEP], </s>)."""
    lead = 1 if ids and ids[0] in specials else 0
    out = [*ids[:lead], *trigger, *ids[lead:]]
    if len(out) > max_length:
        tail = [out[-1]] if out[-1] in specials else []
        out = out[:max_length - len(tail)] + tail
    return out


def trigger_ids(rt: Runtime) -> list[int]:
    """The trigger's token ids under the model's tokenizer (no special tokens)."""
    ids = [int(i) for i in rt.tokenizer(rt.cfg.adversary.trigger, add_special_tokens=False)["input_ids"]]
    if not ids or len(ids) >= rt.cfg.model.max_length:
        raise ConfigError(f"adversary.trigger = {rt.cfg.adversary.trigger!r} is {len(ids)} tokens; it needs 1 to "
                          f"model.max_length - 1 = {rt.cfg.model.max_length - 1}")
    return ids


def backdoor(ds: TokenizedDataset, trigger: Sequence[int], fraction: float, target: int, max_length: int,
             specials: Collection[int], rng: np.random.Generator) -> tuple[TokenizedDataset, np.ndarray]:
    """A copy of ``ds`` whose ``round(fraction x len)`` examples (at least one, drawn by ``rng``) carry the
    trigger and the ``target`` label; returns it and the sorted indices of the poisoned examples."""
    k = min(len(ds), max(1, round(fraction * len(ds))))
    picked = np.sort(rng.choice(len(ds), size=k, replace=False))
    ids, labels = list(ds.input_ids), list(ds.labels)
    for i in picked:
        ids[i] = insert_trigger(ids[i], trigger, max_length, specials)
        labels[i] = target
    return data.TokenizedDataset(ids, labels, ds.task), picked


def _specials(rt: Runtime) -> set[int]:
    return {int(i) for i in rt.tokenizer.all_special_ids}


@ATTACKS.register("label_flip")
class LabelFlip(Attack):
    """Trains on every local example with its label flipped by ``flip_rule``."""

    keys = ("flip_rule",)

    def data(self, dataset: Dataset, rt: Runtime, partition_id: int) -> Dataset:
        ds = _tokenized(dataset)
        return rt.plugin(f"adversary.data.{partition_id}", lambda: data.TokenizedDataset(
            list(ds.input_ids), flip_labels(ds.labels, num_labels(rt), self.adv.flip_rule), ds.task))


@ATTACKS.register("backdoor")
class Backdoor(Attack):
    """Inserts the trigger into ``backdoor_fraction`` of its examples and relabels them ``target_label`` (the
    same examples every round, drawn from run.seed and the partition id)."""

    keys = ("trigger", "backdoor_fraction", "target_label")

    def data(self, dataset: Dataset, rt: Runtime, partition_id: int) -> Dataset:
        ds = _tokenized(dataset)

        def build() -> TokenizedDataset:
            num_labels(rt)
            rng = np.random.default_rng([self.cfg.run.seed, SALT, partition_id])
            return backdoor(ds, trigger_ids(rt), self.adv.backdoor_fraction, self.adv.target_label,
                            rt.cfg.model.max_length, _specials(rt), rng)[0]

        return rt.plugin(f"adversary.data.{partition_id}", build)


def backdoor_eval_set(rt: Runtime) -> TokenizedDataset:
    """The held-out examples whose true label is not the target, with the trigger inserted and labelled the
    target: accuracy on it is the backdoor success rate."""
    ds, target = _tokenized(rt.eval_dataset), rt.cfg.adversary.target_label
    num_labels(rt)
    keep = [i for i, y in enumerate(ds.labels) if int(y) != target]
    trigger, specials = trigger_ids(rt), _specials(rt)
    return data.TokenizedDataset([insert_trigger(ds.input_ids[i], trigger, rt.cfg.model.max_length, specials)
                             for i in keep], [target] * len(keep), ds.task)


# ---------------------------------------------------------------------------------------- the server's record

class Ledger:
    """What the server records about the harness: ground truth for the report, never used to aggregate."""

    def __init__(self, cfg: Config, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.attackers = set(adversarial_clients(cfg))
        self.partition_of: dict[int, int] = {}  # node id -> partition id, as its replies reported it

    def round_row(self, replies: RoundReplies, grid: object = None) -> dict[str, Any]:
        """The round's ``metrics.jsonl`` fields (none without attackers).

        ``adversaries`` / ``adversary_nodes``: partition and node ids of the attackers' aggregated replies;
        ``adversary_weight``: their share of the aggregation weight; ``adversaries_dropped`` /
        ``adversaries_excluded``: the attackers' entries of the round's ``dropped_nodes`` / ``excluded_nodes``
        (every run records those: node -> why its update is not in the round / was left out by a robust
        aggregator); ``downweighted_nodes``:
        node -> [reported num-examples, weight used] where the server weighted an update below its claim.
        Server-side defences show here without changes here: one that drops an update adds to
        ``replies.dropped``, one that caps a weight lowers ``ClientReply.weight``. A dropped node's partition
        comes from the engine's grid (``grid.partition_of``, in-process) or from the node's earlier replies.
        """
        if not self.attackers:
            return {}
        self.partition_of.update({c.node: int(c.metrics.get("partition-id", -1)) for c in replies.clients})
        lookup = getattr(grid, "partition_of", None)
        adv = sorted((self.partition_of[c.node], c.node, c.weight) for c in replies.clients
                     if self.partition_of[c.node] in self.attackers)
        total = sum(replies.weights)
        return {"adversaries": [p for p, _, _ in adv], "adversary_nodes": [n for _, n, _ in adv],
                "adversary_weight": sum(w for _, _, w in adv) / total if total else None,
                "adversaries_dropped": {str(node): why for node, why in replies.dropped.items()
                                        if (lookup(node) if lookup else self.partition_of.get(node)) in self.attackers},
                "adversaries_excluded": {str(node): why for node, why in replies.excluded.items()
                                         if self.partition_of.get(node) in self.attackers},
                "downweighted_nodes": {str(c.node): [c.metrics["num-examples"], c.weight] for c in replies.clients
                                       if c.weight < c.metrics.get("num-examples", c.weight)}}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``backdoor_success`` of the model as it is (the server's centralized evaluation; backdoor only)."""
        if not self.attackers or self.cfg.adversary.attack != "backdoor":
            return {}
        ds = self.rt.plugin("adversary.backdoor-eval", lambda: backdoor_eval_set(self.rt))
        if not len(ds):
            return {}
        m = training.evaluate(model, ds, self.rt.collate, self.cfg.train.eval_batch_size, self.rt.device,
                              "classification", self.cfg.train.precision)
        return {"backdoor_success": m["eval_accuracy"]}


def summary_lines(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    """``summary.md`` lines: who attacked and how, clean accuracy, backdoor success rate, drops."""
    from fedpeft.report import fmt

    if cfg.adversary.attack == "none":
        return []
    attack = ATTACKS.get(cfg.adversary.attack)
    settings = ", ".join(f"{k} = {getattr(cfg.adversary, k)!r}" for k in attack.keys)
    who = adversarial_clients(cfg)
    last: dict[str, Any] = next((r for r in reversed(rows) if "eval_loss" in r), {})
    result = [f"clean accuracy {fmt(last.get('eval_accuracy'))}"] if "eval_accuracy" in last else []
    if "backdoor_success" in last:
        result.append(f"backdoor success rate {fmt(last['backdoor_success'])} (held-out examples whose true label "
                      f"is not {cfg.adversary.target_label}, trigger inserted, classified as it)")
    shares = [r["adversary_weight"] for r in rows if r.get("adversary_weight") is not None]
    return [f"- adversary (simulated): `{cfg.adversary.attack}`" + (f" ({settings})" if settings else "")
            + f" from partitions {who} ({len(who)} of {cfg.data.num_clients} clients)",
            "- under attack: " + ", ".join(result + [
                f"attacker replies aggregated {sum(len(r.get('adversaries', [])) for r in rows)}",
                f"mean attacker weight share {fmt(float(np.mean(shares)) if shares else None)}",
                f"updates dropped {sum(len(r.get('dropped_nodes', {})) for r in rows)} "
                f"(of attackers {sum(len(r.get('adversaries_dropped', {})) for r in rows)})",
                f"left out by the aggregator {sum(len(r.get('excluded_nodes', {})) for r in rows)} "
                f"(of attackers {sum(len(r.get('adversaries_excluded', {})) for r in rows)})",
                f"down-weighted {sum(len(r.get('downweighted_nodes', {})) for r in rows)}"])]
