"""The compact SecAgg+ key exchange under a packed field: public keys travel as X9.62 compressed EC points and encrypted
key shares as raw Fernet tokens; the server restores Flower's exact PEM / base64 bytes, and a malformed key costs that
client only."""

from __future__ import annotations

import os

import numpy as np
import pytest
import test_secagg
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from test_secagg import DROPOUT_OK, SECAGG, RecordingGrid, flat, make_cfg, one_round, secagg_bound, weighted

from fedpeft import protocol
from fedpeft.compression.secure import compact_key_exchange, expand_key_exchange, levels_for
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
