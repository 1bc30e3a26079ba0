"""Secure aggregation of the training round with Flower's SecAgg+ (``privacy.secure_aggregation``).

**Server.** :class:`SecureAggregator` runs Flower's own :class:`SecAggPlusWorkflow` (all four stages:
setup, share keys, collect masked vectors, unmask) for one of our rounds. The workflow is written for
Flower's legacy ``DefaultWorkflow``: it takes a ``LegacyContext`` whose legacy ``Strategy`` samples
clients (``configure_fit``) and receives the unmasked sum (``aggregate_fit``). We hand it a
LegacyContext around a one-round strategy (:class:`_RoundStrategy`) that returns *our* sampled nodes
and instructions and captures the unmasked aggregate, so no protocol logic is re-implemented here.
The grid it talks through (:class:`_WireGrid`) counts the serialized bytes of every SecAgg+ message in
both directions and hands each node a copy of its message, as a real transport does (Flower's client
mod pops keys from what it receives; the in-process engine would otherwise share one object).

**Client** (:mod:`fedpeft.clients.secagg`). ``client_mod`` wraps the ClientApp's train handler: plain
messages pass through; SecAgg+ messages go through Flower's ``secaggplus_mod``, which calls ``_train_for_secagg``. That
turns the legacy ``FitIns`` back into our instruction, runs the normal training, decodes the client's
own (lossless) payload and answers a legacy ``FitRes`` holding one flat float64 vector: the delta (+ the
0/1 clip indicator under adaptive clipping). Flower's mod weights it, quantizes, masks it and clears it
from the reply, so the server only ever receives masked integers.

**Compressed uplink** (``privacy.secagg_bits``, ``privacy.secagg_keep``, distributed DP): the field is
sized to what the sum can reach (:func:`fedpeft.protocol.secure_field`), clients keep the coordinates of
the round's shared subspace (the server's per-round seed travels in the instruction), and each masked
element travels at about ``log2(modulus)`` bits (base-modulus digits, :func:`fedpeft.compression.secure.pack_field`;
the integer uplink's modulus is the exact ``m * L + 1``, not a power of 2), public keys as compressed EC points and
key shares in binary form: the grid restores Flower's own forms before the workflow reads them. A malformed masked
vector or key, packed or dense (Flower's int64 arrays are checked before its workflow parses them), becomes that
client's error reply, so the workflow drops that client (its masks are reconstructed) and the round goes on.
Under distributed DP (:mod:`fedpeft.privacy.distributed`) the clients' vectors are noised integers on
Flower's grid with a quantization step of exactly 1, so the unmasked sum is their exact integer sum.

**Weights.** FedAvg weights by ``num-examples``: Flower's mod multiplies the vector by
``w / max_weight`` (quantized) before masking and sums that factor as an extra element, and the
workflow divides by it. Under client-level DP every weight is 1 (the DP average is uniform with the
fixed denominator m): the server turns the mean back into the sum and adds noise
(:meth:`fedpeft.privacy.server_dp.ServerPrivacy.release_secure`). The round reaches the loop as a
:class:`~fedpeft.server.replies.RoundReplies` whose ``secure_mean`` stands in for the per-client deltas.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import FitIns, Parameters, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedpeft import protocol
from fedpeft.compression import Layout
from fedpeft.compression.secure import (
    check_dense_field,
    check_key_exchange,
    expand_key_exchange,
    subspace,
    unpack_field,
)
from fedpeft.config import Config
from fedpeft.errors import PayloadError
from fedpeft.models import AdapterState
from fedpeft.protocol import DP_FLAG, PAYLOAD_TYPE, SLACK, SUBSPACE_SEED, WEIGHT_CAP, SecureField
from fedpeft.server.delegating import DelegatingGrid
from fedpeft.server.replies import UP_KEYS, ClientReply, RoundReplies
from fedpeft.server.sanity import ReplyChecks

log = logging.getLogger(__name__)


def _shares(value: float) -> int | float:
    """Our config's 'fraction or count' as Flower wants it: a float fraction or an int count."""
    return float(value) if value <= 1 else int(value)


def rounding_slack(num_elements: int, clipping_range: float, quantization_range: int) -> float:
    """Largest L2 norm that SecAgg+'s stochastic rounding can add to one client's vector (weight 1)."""
    return math.sqrt(num_elements) * 2.0 * clipping_range / quantization_range


@dataclass
class SecureRound:
    """What one SecAgg+ round leaves the server: the aggregate and per-client public metadata only."""

    mean: AdapterState | None = None  # weighted mean of the summed updates (uniform under client DP)
    nodes: list[int] = field(default_factory=list)  # nodes whose update is inside the sum
    metrics: list[dict[str, float]] = field(default_factory=list)  # their cleartext metrics
    indicator_sum: float | None = None  # sum of the clip indicators (adaptive clipping)
    bytes_down: dict[str, int] = field(default_factory=dict)  # per stage
    bytes_up: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage (collect includes training)
    failure: str = ""
    withheld: bool = False  # fewer masked updates than privacy.secagg_min_survivors: not unmasked, nothing released

    def replies(self, sampled: Iterable[int], checks: ReplyChecks | None = None, rnd: int = 0) -> RoundReplies:
        """The round as every other round reads it: cleartext metadata per client (weighed and checked by the
        sanity ``checks`` when given), the secure mean standing in for their deltas, all SecAgg+ traffic as
        framing."""
        total_up = sum(self.bytes_up.values())
        up: dict[str, float] = {**dict.fromkeys(UP_KEYS, 0.0), "bytes_up": total_up, "up_framing": total_up}
        dropped = {node: self.failure or "not in the secure sum" for node in sampled if node not in self.nodes}
        out = RoundReplies(dropped=dropped, secure_mean=self.mean, up=up, bytes_down=sum(self.bytes_down.values()),
                           clip_indicators=indicators_from_sum(self.indicator_sum, len(self.nodes)))
        for node, metrics in zip(self.nodes, self.metrics):
            weight = metrics["num-examples"]  # a whole number in [1, MAX_NUM_EXAMPLES): protocol.parse_metrics
            if checks is not None:
                weight = checks.weight(metrics, node, rnd)
                metrics = out.checked_metrics(checks, metrics, node, rnd)
            out.clients.append(ClientReply(node, weight, metrics))
        stats: dict[str, float] = {"secagg_clipped": sum(c.metrics.get("secagg-clipped", 0.0) for c in out.clients),
                                   "secagg_withheld": float(self.withheld)}
        for stage, n in self.bytes_down.items():
            stats[f"secagg_down_{stage}"] = n
        for stage, n in self.bytes_up.items():
            stats[f"secagg_up_{stage}"] = n
        for stage, t in self.seconds.items():
            stats[f"secagg_seconds_{stage}"] = t
        if stats["secagg_clipped"]:
            log.warning("SecAgg+ clipped %d update elements to +-privacy.secagg_clipping_range",
                        stats["secagg_clipped"])
        out.secagg = stats
        return out


def _copy_records(content: RecordDict) -> RecordDict:
    """A copy of every record (arrays are shared, never mutated): the receiver may edit what it gets."""
    # each record is rebuilt by its own type from its own items (mypy sees only the union of the three)
    return RecordDict({name: type(record)(dict(record)) for name, record in content.items()})  # type: ignore[arg-type]


class _WireGrid(DelegatingGrid):
    """Delegates to the round's grid; copies what it sends, counts serialized bytes per stage."""

    def __init__(self, inner: Grid, result: SecureRound, field: SecureField) -> None:
        super().__init__(inner)
        self.result, self.field = result, field

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent, stage, originals = [], "?", {}
        for msg in messages:
            originals[msg.metadata.dst_node_id] = msg
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            self.result.bytes_down[stage] = self.result.bytes_down.get(stage, 0) + protocol.record_bytes(msg.content)
            sent.append(Message(_copy_records(msg.content), msg.metadata.dst_node_id, msg.metadata.message_type,
                                group_id=msg.metadata.group_id))
        t0 = time.perf_counter()
        replies = list(self.inner.send_and_receive(sent, timeout=timeout))
        self.result.seconds[stage] = round(time.perf_counter() - t0, 3)
        out = []
        for reply in replies:
            if not reply.has_error():
                self.result.bytes_up[stage] = self.result.bytes_up.get(stage, 0) + protocol.record_bytes(reply.content)
                reply = self._received(reply, originals.get(reply.metadata.src_node_id))
            if reply.has_error():
                log.warning("SecAgg+ %s: node %s failed: %s", stage, reply.metadata.src_node_id, reply.error.reason)
            out.append(reply)
        return out

    def _received(self, reply: Message, original: Message | None) -> Message:
        """A reply as Flower's workflow reads it. Packed field: the compact reply as Flower sent it (PEM public keys,
        base64 key shares, the masked vector as Flower's two int64 arrays, factor and vector); dense: checked as
        received. Malformed: an error reply (costs that client only)."""
        if original is None:
            raise PayloadError(f"SecAgg+ reply from node {reply.metadata.src_node_id}, which was sent nothing")
        packed = self.field.packed
        content = _copy_records(reply.content) if packed else reply.content  # what was received stays as received
        request = original.content.config_records[RECORD_KEY_CONFIGS]
        try:
            values = content.config_records.get(RECORD_KEY_CONFIGS)
            if values is None:
                raise PayloadError(f"no {RECORD_KEY_CONFIGS!r} record")
            stage = str(request[Key.STAGE])
            missing = [key for key in STAGE_REPLY[stage] if key not in values]
            if missing:
                raise PayloadError(f"{stage} reply lacks {missing}")
            if stage == Stage.SHARE_KEYS:
                _check_destinations(values, request)
            if stage == Stage.COLLECT_MASKED_VECTORS:
                _check_fitres(content)
            keys = expand_key_exchange if packed else check_key_exchange
            keys(values, protocol.KEY_EXCHANGE)  # type: ignore[arg-type]
            if stage == Stage.UNMASK:
                _check_shares(values, request)
            masked = values.get(Key.MASKED_PARAMETERS)
            if masked is not None and not packed:
                check_dense_field(masked, [(1,), (self.field.width,)], self.field.modulus_range)
            elif masked is not None:
                if not (isinstance(masked, list) and len(masked) == 1 and isinstance(masked[0], bytes)):
                    raise PayloadError("expected one packed byte string of masked parameters")
                arrays = unpack_field(masked[0], [1, self.field.width], self.field.modulus_range)
                values[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
        except PayloadError as e:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"malformed SecAgg+ reply: {e}"),
                           reply_to=original)
        return Message(content, reply_to=original) if packed else reply


#: what each stage's reply must carry for Flower's workflow to read it (a missing entry would halt the round)
STAGE_REPLY = {Stage.SETUP: (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2),
               Stage.SHARE_KEYS: (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST),
               Stage.COLLECT_MASKED_VECTORS: (Key.MASKED_PARAMETERS,),
               Stage.UNMASK: (Key.NODE_ID_LIST, Key.SHARE_LIST)}


def _check_destinations(values: Any, request: Any) -> None:
    """A share-keys reply sends one encrypted key share to each of some of the neighbours it was sent the keys of,
    once each; :class:`PayloadError` if not (Flower's workflow would halt the round on unequal lists)."""
    dsts, ctxts = values[Key.DESTINATION_LIST], values[Key.CIPHERTEXT_LIST]
    if not (isinstance(dsts, list) and isinstance(ctxts, list) and len(dsts) == len(ctxts)):
        raise PayloadError("share-keys reply: destinations and key shares must be two lists of one length")
    neighbours = {int(k) for k in request if k.isdigit()}
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dsts) or len(set(dsts)) != len(dsts) \
            or not set(dsts) <= neighbours:
        raise PayloadError(f"share-keys reply sends to {sorted(dsts)}, not to distinct neighbours among "
                           f"{sorted(neighbours)}")


def _check_fitres(content: RecordDict) -> None:
    """A masked-vector reply holds the legacy FitRes records Flower's workflow reads, with cleartext metrics that
    pass :func:`fedpeft.protocol.parse_metrics`; :class:`PayloadError` if not."""
    try:
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
        if not isinstance(fitres.num_examples, int) or isinstance(fitres.num_examples, bool):
            raise TypeError(f"num_examples {fitres.num_examples!r} is not an integer")
    except (KeyError, TypeError, ValueError) as e:
        raise PayloadError(f"masked-vector reply is not a legacy FitRes: {type(e).__name__}: {e}") from None
    protocol.parse_metrics(fitres.metrics)


def _check_shares(values: Any, request: Any) -> None:
    """An unmask reply names exactly the neighbours it was asked about (active and dead), once each, with one Shamir
    share each (4 index bytes, then 16-byte chunks), as Flower's workflow unpacks it; :class:`PayloadError` if not.
    A share of the right form but the wrong value cannot be told apart here (see docs/privacy.md)."""
    asked = sorted(int(n) for key in (Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST) for n in request.get(key, []))
    nids, shares = values.get(Key.NODE_ID_LIST), values.get(Key.SHARE_LIST)
    if not (isinstance(nids, list) and isinstance(shares, list) and len(nids) == len(shares)):
        raise PayloadError("unmask reply: node ids and key shares must be two lists of one length")
    if sorted(nids) != asked:
        raise PayloadError(f"unmask reply names nodes {sorted(nids)}, it was asked about {asked}")
    if not all(isinstance(s, bytes) and len(s) >= 20 and (len(s) - 4) % 16 == 0 for s in shares):
        raise PayloadError("unmask reply: a key share is not 4 index bytes and 16-byte chunks")


class _RoundStrategy(Strategy):
    """The legacy Strategy the SecAgg+ workflow asks for: our sampled nodes in, the unmasked sum out."""

    def __init__(self, contents: dict[int, RecordDict], grid: Grid, extra: dict[str, Any], result: SecureRound,
                 width: int) -> None:
        self.contents, self.grid, self.extra, self.result, self.width = contents, grid, extra, result, width
        self.vector: np.ndarray | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        pairs = []
        for node, content in self.contents.items():
            data = protocol.payload_bytes(content[protocol.GLOBAL])
            fit_config = {**dict(protocol.config_record(content)), **self.extra}
            proxy = GridClientProxy(node, self.grid, self.grid.run.run_id)
            pairs.append((proxy, FitIns(Parameters(tensors=[data], tensor_type=PAYLOAD_TYPE), fit_config)))
        return pairs

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        for proxy, res in results:
            self.result.nodes.append(int(proxy.node_id))
            self.result.metrics.append(protocol.parse_metrics(res.metrics))  # checked as received (_check_fitres)
        if results:
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            if len(arrays) != 1 or arrays[0].shape != (self.width,) or not np.all(np.isfinite(arrays[0])):
                raise PayloadError(f"SecAgg+ aggregate has shapes {[a.shape for a in arrays]}, "
                                   f"expected one vector of {self.width} finite values")
            self.vector = arrays[0]
        return None, {}  # the loop applies the aggregate itself

    # the workflow calls only the two methods above
    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow with three changes: any modulus above the quantization range (not only a power of 2), a
    node lost before it shared its key shares is not "dead", and a round with fewer than ``min_survivors`` masked
    vectors stops before the unmask stage, so the server never learns a sum of fewer (Flower's own check is its
    reconstruction threshold, which may be lower; distributed DP's noise is accounted for ``min_survivors`` shares).

    Flower 1.41 counts every node sampled at setup as dead in the unmask stage if it is no longer
    active, and asks the survivors for its key shares; a node that dropped during setup or share-keys
    never sent any, so the survivors fail (KeyError) and the round halts. Such a node is in no one's
    masks (clients mask only with the nodes whose shares they received), so after share-keys the
    protocol's participants are exactly the nodes still active.
    """

    def _check_init_params(self) -> None:
        """Flower's checks, except that the modulus need not be a power of 2: masking mod any M hides a value
        (Flower asks for 2**n against int overflow, which an M below 2**32 cannot cause), and the exact field
        ``m * L + 1`` packs at log2 of it (:func:`fedpeft.protocol.secure_field`)."""
        exact = self.modulus_range
        self.modulus_range = 1 << (exact - 1).bit_length()
        try:
            super()._check_init_params()
        finally:
            self.modulus_range = exact

    def __init__(self, min_survivors: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_survivors = min_survivors
        self.masked = -1  # masked vectors of the round's collect stage (-1: it did not finish)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self.masked = len(state.active_node_ids)
        return ok and self.masked >= self.min_survivors


class SecureAggregator:
    """Runs one training round under SecAgg+; the server gets the aggregate, never an individual update."""

    def __init__(self, cfg: Config, layout: Layout, max_partition: int) -> None:
        p = cfg.privacy
        self.cfg, self.layout = cfg, layout
        self.client_dp = p.mode in ("client", "both")
        self.adaptive = self.client_dp and p.adaptive_clip
        self.min_survivors = p.secagg_min_survivors
        self.field = protocol.secure_field(p, layout.total, cfg.federation.clients_per_round or cfg.data.num_clients)
        self.ddp = self.field.ddp
        self.width = self.field.width  # elements summed (+ the clip indicator)
        # every weight is 1: client-level / distributed DP average uniformly; under local DP the clients hide their
        # sizes (a cap of the largest partition would quantize a weight of 1 to 0 and the sum to nothing)
        uniform = self.client_dp or self.ddp is not None or protocol.hides_metrics(p)
        self.max_weight = 1.0 if uniform else float(p.secagg_max_weight or max(1, max_partition))
        timeout = p.secagg_timeout or cfg.federation.round_timeout
        f = self.field
        self.workflow = _SecAggPlus(
            self.min_survivors, num_shares=_shares(p.secagg_num_shares),
            reconstruction_threshold=_shares(p.secagg_reconstruction_threshold),
            max_weight=self.max_weight, clipping_range=f.clipping_range,
            quantization_range=f.quantization_range, modulus_range=f.modulus_range,
            timeout=timeout or None)
        self.slack = rounding_slack(self.width, f.clipping_range, f.quantization_range)
        if self.client_dp and self.slack >= 0.1 * p.clip_norm:
            log.warning("SecAgg+ rounding can add up to %.3g to an update's norm (clip norm %.3g): raise "
                        "privacy.secagg_quantization_range", self.slack, p.clip_norm)

    def run_round(self, grid: Grid, contents: dict[int, RecordDict], rnd: int,
                  checks: ReplyChecks | None = None) -> RoundReplies:
        """Drive the four SecAgg+ stages for the sampled nodes (keys of ``contents``); ``checks``: the sanity
        checks of the clients' cleartext metrics."""
        result = SecureRound()
        wire = _WireGrid(grid, result, self.field)
        seed = int(np.random.default_rng([self.cfg.run.seed, 0x5ECA, rnd]).integers(2**31))  # public, resumable
        extra = {DP_FLAG: self.client_dp, WEIGHT_CAP: self.max_weight, SLACK: self.slack, SUBSPACE_SEED: seed}
        strategy = _RoundStrategy(contents, wire, extra, result, self.width)
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
                            MAIN_PARAMS_RECORD: ArrayRecord()})
        context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state,
                                        run_config={}), strategy=strategy)
        self.workflow.masked = -1
        try:
            self.workflow(wire, context)
        except (PayloadError, ValueError, KeyError, TypeError, IndexError) as e:  # a malformed masked vector
            result.failure = f"{type(e).__name__}: {e}"
        if not result.failure and 0 <= self.workflow.masked < self.min_survivors:  # stopped before the unmask stage
            result.failure = (f"only {self.workflow.masked} masked update(s) arrived, fewer than "
                              f"privacy.secagg_min_survivors = {self.min_survivors}: the sum was not unmasked")
            result.withheld = True
        if strategy.vector is None or result.failure:
            result.nodes, result.metrics = [], []
            result.failure = result.failure or "SecAgg+ halted (too few nodes or shares left; see the log)"
            log.warning("round %d: %s", rnd, result.failure)
            return result.replies(contents, checks, rnd)
        vec = self._expand(strategy.vector, len(result.nodes), seed)
        result.mean = {name: torch.from_numpy(vec[lo:hi].reshape(shape).astype(np.float32))
                       for name, shape, lo, hi in zip(self.layout.names, self.layout.shapes,
                                                      self.layout.offsets[:-1], self.layout.offsets[1:])}
        if self.adaptive:
            result.indicator_sum = float(vec[-1]) * len(result.nodes)
        return result.replies(contents, checks, rnd)

    def _expand(self, vec: np.ndarray, n: int, seed: int) -> np.ndarray:
        """The unmasked mean in adapter coordinates: distributed DP's exact integer sum times the grid step,
        the subspace put back in place and scaled by 1 / keep (unbiased; post-processing of the sum)."""
        if self.ddp is not None:
            vec = np.rint(vec * n) * (self.ddp.scale / n)
        if self.field.keep >= 1:
            return vec
        out = np.zeros(self.layout.total, np.float64)  # keep < 1 never carries the clip indicator
        out[subspace(seed, self.layout.total, self.field.keep)] = vec / self.field.keep
        return out


def indicators_from_sum(total: float | None, n: int) -> list[float]:
    """The clip indicators as a list with the securely summed count of ones (all the clipper needs)."""
    if total is None:
        return []
    ones = min(n, max(0, round(total)))
    return [1.0] * ones + [0.0] * (n - ones)
