"""The compact SecAgg+ key exchange under a packed field: public keys travel as X9.62 compressed EC points and encrypted
key shares as raw Fernet tokens; the server restores Flower's exact PEM / base64 bytes, and a malformed key costs that
client only. On the dense field (Flower's own forms) a malformed key or masked vector costs that client only too."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import test_secagg
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from test_secagg import DROPOUT_OK, SECAGG, RecordingGrid, flat, make_cfg, one_round, secagg_bound, weighted

from fedpeft import protocol
from fedpeft.compression.secure import (
    check_dense_field,
    check_key_exchange,
    compact_key_exchange,
    expand_key_exchange,
    levels_for,
)
from fedpeft.errors import PayloadError
from fedpeft.simulation.inprocess import node_id

data, plain = test_secagg.data, test_secagg.plain
BITS = {"privacy.secagg_bits": 8}


def flower_values() -> dict[str, object]:
    """A setup and a share-keys reply's key material, as Flower's SecAgg+ mod produces it."""
    sk, pk = generate_key_pairs()
    _, pk2 = generate_key_pairs()
    key = generate_shared_key(sk, pk)
    return {Key.PUBLIC_KEY_1: public_key_to_bytes(pk), Key.PUBLIC_KEY_2: public_key_to_bytes(pk2),
            Key.CIPHERTEXT_LIST: [encrypt(key, os.urandom(n)) for n in (60, 396)], Key.STAGE: "x"}


def test_compact_key_exchange_is_lossless_and_smaller() -> None:
    original = flower_values()
    values = dict(original)
    compact_key_exchange(values, protocol.KEY_EXCHANGE)
    for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2):  # 49 bytes, not PEM's 215 (or DER's 120)
        assert len(values[key]) == 49 and values[key][0] in (2, 3)  # type: ignore[arg-type, index]
    size = lambda v: sum(len(x) for k in protocol.KEY_EXCHANGE for x in (v[k] if isinstance(v[k], list) else [v[k]]))  # noqa: E731
    assert size(values) < 0.75 * size(original)
    expand_key_exchange(values, protocol.KEY_EXCHANGE)
    assert values == original


@pytest.mark.parametrize("key, value", [(Key.PUBLIC_KEY_1, b"\x30\x03junk"), (Key.PUBLIC_KEY_2, [b"a list"]),
                                        (Key.PUBLIC_KEY_1, b"\x02" + b"\xff" * 48),  # x beyond the field: no point
                                        (Key.PUBLIC_KEY_2, b"\x04" + b"\x01" * 48),  # not a compressed point
                                        (Key.CIPHERTEXT_LIST, [1, 2])])
def test_a_malformed_compact_entry_is_a_payload_error(key, value) -> None:
    values = flower_values()
    compact_key_exchange(values, protocol.KEY_EXCHANGE)
    values[key] = value
    with pytest.raises(PayloadError, match="SecAgg"):
        expand_key_exchange(values, protocol.KEY_EXCHANGE)
    with pytest.raises(PayloadError, match="SecAgg"):  # what the client would not send compact losslessly
        compact_key_exchange({Key.CIPHERTEXT_LIST: [b"gAAA="]}, protocol.KEY_EXCHANGE)


class KeyCorruptingGrid(RecordingGrid):
    """The in-process grid; one node's compact public key is cut short on the way to the server."""

    victim = node_id(2)

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            values = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if reply.metadata.src_node_id == self.victim and Key.PUBLIC_KEY_1 in values:
                values[Key.PUBLIC_KEY_1] = values[Key.PUBLIC_KEY_1][:-5]
        return replies


def test_the_server_receives_compact_keys_and_a_malformed_key_costs_that_client(data, plain, monkeypatch):
    monkeypatch.setattr(test_secagg, "RecordingGrid", KeyCorruptingGrid)
    c = 1.1 * max(float(np.abs(v[0]).max()) for v in plain["clients"].values())
    cfg = make_cfg(data, **SECAGG, **BITS, **DROPOUT_OK, **{"privacy.secagg_clipping_range": c})
    server, grid, row, start = one_round(cfg, data[1] / "keys")
    keys = [r.content.config_records[RECORD_KEY_CONFIGS] for r in grid.seen
            if Key.PUBLIC_KEY_1 in r.content.config_records[RECORD_KEY_CONFIGS]]
    shares = [r.content.config_records[RECORD_KEY_CONFIGS] for r in grid.seen
              if Key.CIPHERTEXT_LIST in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(keys) == 3 and all(len(v[Key.PUBLIC_KEY_2]) == 49 for v in keys)  # compressed points
    assert shares and all(t[0] == 0x80 for v in shares for t in v[Key.CIPHERTEXT_LIST])  # raw Fernet: version byte
    assert row["replies"] == 2 and row["dropped"] == 1  # the round goes on without the corrupted client
    survivors = sorted(n for n in plain["clients"] if n != KeyCorruptingGrid.victim)
    expected, weights = weighted(plain["clients"], survivors)
    mean = flat(server.global_state, plain["names"]) - flat(start, plain["names"])
    bound = secagg_bound(weights, server.secagg.max_weight, [plain["clients"][n][0] for n in survivors], c,
                         levels_for(8))
    assert float(np.abs(mean - expected).max()) <= bound


# ---------------------------------------------------------------- the dense field: Flower's own forms, checked

def npy(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kwargs)
    return buf.getvalue()


def masked_arrays() -> list[bytes]:
    return [npy(np.array([7], np.int64)), npy(np.arange(20, dtype=np.int64))]


def test_a_well_formed_dense_reply_passes_the_checks_unchanged() -> None:
    values = flower_values()
    before = dict(values)
    check_key_exchange(values, protocol.KEY_EXCHANGE)
    assert values == before
    check_dense_field(masked_arrays(), [(1,), (20,)], 20)


@pytest.mark.parametrize("arrays, why", [
    (masked_arrays()[:1], "2 byte strings"),
    ([masked_arrays()[0], npy(np.arange(19, dtype=np.int64))], "shape"),
    ([masked_arrays()[0], npy(np.arange(20, dtype=np.float64))], "dtype"),
    ([masked_arrays()[0], npy(np.arange(1, 21, dtype=np.int64))], "outside"),  # 20 is not below the modulus
    ([masked_arrays()[0], npy(np.array([-1] + [0] * 19, np.int64))], "outside"),
    ([masked_arrays()[0], npy(np.array([object()] * 20), allow_pickle=True)], "dtype"),  # refused before reading
    ([masked_arrays()[0], masked_arrays()[1][:-8]], "not a .npy"),  # cut short
    ([masked_arrays()[0], b"\x80\x04junk"], "not a .npy"),
])
def test_a_malformed_dense_masked_vector_is_a_payload_error(arrays, why) -> None:
    with pytest.raises(PayloadError, match=why):
        check_dense_field(arrays, [(1,), (20,)], 20)


@pytest.mark.parametrize("key, value", [(Key.PUBLIC_KEY_1, b"-----BEGIN PUBLIC KEY-----\njunk"),
                                        (Key.PUBLIC_KEY_2, b"\x02" + b"\x01" * 48),  # compact where PEM is due
                                        (Key.CIPHERTEXT_LIST, [b"not base64!"])])
def test_a_malformed_dense_key_is_a_payload_error(key, value) -> None:
    values = flower_values()
    values[key] = value
    with pytest.raises(PayloadError, match="SecAgg"):
        check_key_exchange(values, protocol.KEY_EXCHANGE)


UNMASK = {  # spoilt unmask replies: (node ids, key shares) -> what the server receives
    "unasked": lambda ids, shares: ([999_999, *ids[1:]], shares),
    "missing": lambda ids, shares: (ids[:-1], shares[:-1]),
    "uneven": lambda ids, shares: (ids, shares[:-1]),
    "short share": lambda ids, shares: (ids, [shares[0][:3], *shares[1:]]),
}


def _fit_metric(key: str, value: object):
    def spoil(content, values) -> None:
        content.config_records["fitres.metrics"][key] = value
    return spoil


def _foreign_destination(content, values) -> None:
    values[Key.DESTINATION_LIST] = [999_999, *values[Key.DESTINATION_LIST][1:]]


SPOILT = {  # reply entry present in the stage to spoil -> how (on the reply content, its SecAgg+ values)
    "no public key": (Key.PUBLIC_KEY_1, lambda content, values: values.pop(Key.PUBLIC_KEY_1)),
    "no destinations": (Key.DESTINATION_LIST, lambda content, values: values.pop(Key.DESTINATION_LIST)),
    "foreign destination": (Key.DESTINATION_LIST, _foreign_destination),
    "no masked vector": (Key.MASKED_PARAMETERS, lambda content, values: values.pop(Key.MASKED_PARAMETERS)),
    "no stage record": (Key.MASKED_PARAMETERS, lambda content, values: content.config_records.pop(RECORD_KEY_CONFIGS)),
    "no fitres metrics": (Key.MASKED_PARAMETERS, lambda content, values: content.config_records.pop("fitres.metrics")),
    "no fitres status": (Key.MASKED_PARAMETERS, lambda content, values: content.config_records.pop("fitres.status")),
    "weight 0": (Key.MASKED_PARAMETERS, _fit_metric("num-examples", 0)),
    "weight -5": (Key.MASKED_PARAMETERS, _fit_metric("num-examples", -5.0)),
    "weight nan": (Key.MASKED_PARAMETERS, _fit_metric("num-examples", float("nan"))),
    "text metric": (Key.MASKED_PARAMETERS, _fit_metric("train-loss", "low")),
    "no shares": (Key.SHARE_LIST, lambda content, values: values.pop(Key.SHARE_LIST)),
}


class DenseCorruptingGrid(RecordingGrid):
    """The in-process grid; one node's dense reply is spoiled on the way to the server (``how``)."""

    victim = node_id(1)
    how = "vector"
    spoiled_for = -1

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.has_error() or reply.metadata.src_node_id != self.victim:
                continue
            values = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if self.how == "vector" and Key.MASKED_PARAMETERS in values:
                factor, vector = values[Key.MASKED_PARAMETERS]
                values[Key.MASKED_PARAMETERS] = [factor, vector[:-8]]  # one element short
            elif self.how == "range" and Key.MASKED_PARAMETERS in values:
                factor, vector = values[Key.MASKED_PARAMETERS]
                spoiled = np.load(io.BytesIO(vector))
                spoiled[0] = 2**62  # far outside the field
                values[Key.MASKED_PARAMETERS] = [factor, npy(spoiled)]
            elif self.how == "key" and Key.PUBLIC_KEY_1 in values:
                values[Key.PUBLIC_KEY_1] = values[Key.PUBLIC_KEY_1][:-30]
            elif self.how in UNMASK and Key.SHARE_LIST in values:
                values[Key.NODE_ID_LIST], values[Key.SHARE_LIST] = UNMASK[self.how](list(values[Key.NODE_ID_LIST]),
                                                                                   list(values[Key.SHARE_LIST]))
            elif self.how in SPOILT and SPOILT[self.how][0] in values:
                SPOILT[self.how][1](reply.content, values)
            elif self.how == "share" and Key.CIPHERTEXT_LIST in values:  # well-formed, but does not decrypt
                tokens = list(values[Key.CIPHERTEXT_LIST])
                raw = bytearray(base64.urlsafe_b64decode(tokens[0]))
                raw[-1] ^= 1
                values[Key.CIPHERTEXT_LIST] = [base64.urlsafe_b64encode(bytes(raw)), *tokens[1:]]
                self.spoiled_for = int(values[Key.DESTINATION_LIST][0])
        return replies


@pytest.mark.parametrize("how", ["vector", "range", "key"])
def test_a_malformed_dense_reply_costs_that_client_not_the_round(data, plain, monkeypatch, how):
    """Flower's workflow would parse and sum the int64 arrays itself: a short one halted the round."""
    monkeypatch.setattr(test_secagg, "RecordingGrid", DenseCorruptingGrid)
    monkeypatch.setattr(DenseCorruptingGrid, "how", how)
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    assert not protocol.packs_masked(cfg.privacy)  # Flower's own dense forms on the wire
    server, grid, row, start = one_round(cfg, data[1] / f"dense-{how}")
    assert isinstance(grid, DenseCorruptingGrid)
    assert row["replies"] == 2 and row["dropped"] == 1 and row["train_loss"] is not None
    test_secagg.assert_survivors_mean(cfg, server, start, plain, DenseCorruptingGrid.victim)


def test_a_key_share_that_does_not_decrypt_costs_the_neighbour_it_was_for(data, plain, monkeypatch):
    """What the server cannot check (only the receiving neighbour can open a share): that neighbour fails the
    next stage and is left out; the round goes on (the limit docs/privacy.md states)."""
    monkeypatch.setattr(test_secagg, "RecordingGrid", DenseCorruptingGrid)
    monkeypatch.setattr(DenseCorruptingGrid, "how", "share")
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    server, grid, row, start = one_round(cfg, data[1] / "dense-share")
    neighbour = grid.spoiled_for
    assert neighbour in plain["clients"] and neighbour != DenseCorruptingGrid.victim
    assert row["replies"] == 2 and list(row["dropped_nodes"]) == [str(neighbour)]
    test_secagg.assert_survivors_mean(cfg, server, start, plain, neighbour)


@pytest.mark.parametrize("how", list(UNMASK))
def test_a_malformed_unmask_reply_costs_that_client_not_the_round(data, plain, monkeypatch, how):
    """Flower's workflow would zip the lists strictly and look every node up: a spoilt reply halted the round.
    Refused, it is one share fewer: the others reconstruct every secret and the victim's update stays in the sum."""
    monkeypatch.setattr(test_secagg, "RecordingGrid", DenseCorruptingGrid)
    monkeypatch.setattr(DenseCorruptingGrid, "how", how)
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    server, grid, row, start = one_round(cfg, data[1] / f"unmask-{how}")
    assert row["replies"] == 3 and row["train_loss"] is not None
    test_secagg.assert_survivors_mean(cfg, server, start, plain, -1)  # all three in the mean


@pytest.mark.parametrize("how", [h for h in SPOILT if h != "no shares"])
def test_a_reply_without_what_the_workflow_reads_costs_that_client_not_the_round(data, plain, monkeypatch, how):
    """Flower's workflow reads each stage's entries without a check: a missing one (KeyError), unequal or foreign
    destinations (a strict zip), or a cleartext weight of 0 or NaN (a division by zero, NaN in metrics.jsonl)
    halted the round or the run for every client. Each is now that client's error reply before its stage."""
    monkeypatch.setattr(test_secagg, "RecordingGrid", DenseCorruptingGrid)
    monkeypatch.setattr(DenseCorruptingGrid, "how", how)
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    server, grid, row, start = one_round(cfg, data[1] / f"spoilt-{how.replace(' ', '-')}")
    assert row["replies"] == 2 and list(row["dropped_nodes"]) == [str(DenseCorruptingGrid.victim)]
    assert np.isfinite(row["train_loss"])
    test_secagg.assert_survivors_mean(cfg, server, start, plain, DenseCorruptingGrid.victim)


def test_an_unmask_reply_without_shares_costs_one_share_not_the_round(data, plain, monkeypatch):
    monkeypatch.setattr(test_secagg, "RecordingGrid", DenseCorruptingGrid)
    monkeypatch.setattr(DenseCorruptingGrid, "how", "no shares")
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    server, grid, row, start = one_round(cfg, data[1] / "spoilt-no-shares")
    assert row["replies"] == 3
    test_secagg.assert_survivors_mean(cfg, server, start, plain, -1)


def test_secagg_counts_only_the_cleartext_metrics_the_sanity_checks_keep(data, plain, monkeypatch):
    """A claim of 1e300 clipped elements was summed into the row before the sanity check dropped the metric."""
    monkeypatch.setattr(test_secagg, "RecordingGrid", DenseCorruptingGrid)
    monkeypatch.setattr(DenseCorruptingGrid, "how", "clipped")
    monkeypatch.setitem(SPOILT, "clipped", (Key.MASKED_PARAMETERS, _fit_metric("secagg-clipped", 1e300)))
    cfg = make_cfg(data, **SECAGG, **DROPOUT_OK)
    server, grid, row, start = one_round(cfg, data[1] / "spoilt-clipped")
    assert row["replies"] == 3 and row["secagg_clipped"] == 0 and row["sanity_metrics_dropped"] == 1
