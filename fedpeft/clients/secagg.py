"""The client side of a SecAgg+ round (the server side is :mod:`fedpeft.server.secagg`).

``client_mod`` wraps the ClientApp's train handler: plain messages pass through; SecAgg+ messages go
through Flower's ``secaggplus_mod``, which calls ``_train_for_secagg``: it turns the legacy ``FitIns``
back into our instruction, runs the normal training, decodes the client's own (lossless) payload and
answers a legacy ``FitRes`` holding one flat float64 vector (the delta, + the 0/1 clip indicator under
adaptive clipping). Flower's mod weights, quantizes and masks it and clears it from the reply, so the
server only ever receives masked integers. With a compressed secure uplink the client keeps the round's
shared subspace (the server's seed), under distributed DP it sends its noised integer vector
(:meth:`fedpeft.privacy.distributed.DistributedDP.encode`, noise from OS entropy: the server knows the run
seed), and ``client_mod`` packs the masked vector at about ``log2(modulus)`` bits per element.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Scalar, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedpeft import config as fconfig
from fedpeft import protocol
from fedpeft.clients import node_runtime
from fedpeft.compression import make_codec
from fedpeft.compression.secure import compact_key_exchange, pack_field, subspace
from fedpeft.errors import FedPeftError, PayloadError
from fedpeft.protocol import DP_FLAG, HIDDEN_METRICS, PAYLOAD_TYPE, SLACK, SUBSPACE_SEED, WEIGHT_CAP

if TYPE_CHECKING:
    from flwr.app.typing import ConfigRecordValues

log = logging.getLogger(__name__)


def client_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Function mod of the train handler: SecAgg+ messages go through Flower's ``secaggplus_mod``."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    reply = secaggplus_mod(msg, context, functools.partial(_train_for_secagg, call_next=call_next))
    if not reply.has_error():
        _pack(reply, context)
    if stage == Stage.UNMASK:  # the round's keys and shares are spent: do not keep them in the node state
        context.state.config_records.pop(RECORD_KEY_STATE, None)
    return reply


def _pack(reply: Message, context: Context) -> None:
    """Under a packed field: public keys and key shares in binary form, and Flower's int64 masked arrays as one
    string of packed base-modulus digits (:func:`fedpeft.compression.secure.pack_field`)."""
    cfg = fconfig.from_run_config(context.run_config)
    if not protocol.packs_masked(cfg.privacy):
        return
    stage_reply = reply.content.config_records[RECORD_KEY_CONFIGS]
    compact_key_exchange(stage_reply, protocol.KEY_EXCHANGE)  # type: ignore[arg-type]
    if Key.MASKED_PARAMETERS not in stage_reply:
        return
    mod_range = context.state.config_records[RECORD_KEY_STATE]["mod_range"]
    masked = stage_reply[Key.MASKED_PARAMETERS]
    if not (isinstance(mod_range, int) and isinstance(masked, list)):
        raise PayloadError("SecAgg+ state has no modulus or the reply no masked arrays")
    arrays = [bytes_to_ndarray(b) for b in masked if isinstance(b, bytes)]
    stage_reply[Key.MASKED_PARAMETERS] = [pack_field(arrays, mod_range)]


def _number(fit_config: dict[str, ConfigRecordValues], key: str) -> float:
    """A number from the server's FitIns config (a list there is a malformed instruction)."""
    value = fit_config[key]
    if isinstance(value, list):
        raise PayloadError(f"SecAgg+ instruction: {key!r} must be a number, got a list")
    return float(value)


def _train_for_secagg(msg: Message, context: Context, call_next: Any) -> Message:
    """Legacy FitIns -> our instruction -> train -> legacy FitRes with the dense update as one vector."""
    fit_config = dict(msg.content.config_records["fitins.config"])
    arrays = list(msg.content.array_records["fitins.parameters"].values())
    if len(arrays) != 1 or arrays[0].stype != PAYLOAD_TYPE:
        raise PayloadError("SecAgg+ instruction does not carry exactly one fedpeft payload")
    data = bytes(arrays[0].data)
    global_record = ArrayRecord({protocol.PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)})
    msg.content = RecordDict({protocol.GLOBAL: global_record, protocol.CONFIG: ConfigRecord(
        {k: v for k, v in fit_config.items() if not k.startswith("secagg-")})})
    reply = call_next(msg, context)
    if reply.has_error():
        raise FedPeftError(f"training failed: {reply.error.reason}")
    payload, metrics = protocol.parse_reply(reply.content)
    cfg = fconfig.from_run_config(context.run_config)
    layout = node_runtime(cfg, context).layout
    delta = make_codec(cfg.compression.uplink).decode(payload, layout)
    vector = np.concatenate([delta[n].numpy().ravel() for n in layout.names]).astype(np.float64)
    field = protocol.secure_field(cfg.privacy, layout.total, cfg.federation.clients_per_round or cfg.data.num_clients)
    if field.keep < 1:
        vector = vector[subspace(int(_number(fit_config, SUBSPACE_SEED)), layout.total, field.keep)]
    dp = bool(fit_config[DP_FLAG])
    if field.ddp is not None:  # clip, grid, noise share: nothing un-noised leaves the client
        vector = field.ddp.encode(vector, np.random.default_rng()).astype(np.float64)
        weight = 1
    elif dp:  # bound what enters the sum, SecAgg+ rounding included: the server cannot clip it
        bound = _number(fit_config, "clip-norm") - _number(fit_config, SLACK)
        norm = float(np.linalg.norm(vector))
        if norm > bound:
            vector *= max(bound, 0.0) / norm
        if "clip-indicator" in metrics:
            vector = np.append(vector, metrics["clip-indicator"])
        weight = 1
    else:
        cap = _number(fit_config, WEIGHT_CAP)
        weight = int(metrics["num-examples"])
        if weight > cap:
            log.warning("num-examples %d exceeds privacy.secagg_max_weight %g: weighted as %g", weight, cap, cap)
            weight = int(cap)
    ratio = weight / _number(fit_config, WEIGHT_CAP)
    clipped = int(np.sum(np.abs(vector * ratio) > field.clipping_range))
    public: dict[str, Scalar] = {k: v for k, v in metrics.items() if k not in HIDDEN_METRICS}
    public["secagg-clipped"] = float(clipped)
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters([vector]),
                    num_examples=weight, metrics=public)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
