"""``fedpeft audit --capture`` on a FedBuff run: the attacks read the buffered updates as in synchronous rounds.

The tiny-llama victim of ``test_audit_capture`` (one SGD step on one example of random characters per round) with
FedBuff (K = 2 of 3 clients, client 2 2.5x slower on the virtual clock), so some updates are applied one or two
updates after the round their message carried. A high F1 against the *drawn* example of a stale update checks that
the capture gave it the adapter its client was sent and the round its sampler was seeded with.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_audit_capture import FAST, _sets

from fedpeft import config, report
from fedpeft.audit import capture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_capture_attacks_fedbuff_updates_including_stale_ones(tmp_path: Path) -> None:
    profiles = tmp_path / "devices.csv"
    profiles.write_text("client,slowdown\n2,2.5\n")
    cfg = config.load(None, _sets(tmp_path, **{"federation.buffer_size": 2, "federation.rounds": 4,
                                               "devices.clock": True, "devices.step_seconds": 0.5,
                                               "devices.profiles": str(profiles)}))
    run_dir = capture.audit_run(cfg, FAST, rounds=[2, 3])  # rounds the messages carried: B != 0 from round 2
    rows = list(csv.DictReader(open(run_dir / "audit.csv")))
    buffered = {(r["round"], node, stale) for r in report.read_metrics(run_dir) for node, _, stale in r["buffered"]}
    # every buffered update sent in round 2 or 3 was attacked, once, under the round its message carried
    assert sorted((int(r["round"]) + int(r["staleness"]), int(r["node"]), int(r["staleness"])) for r in rows) == \
        sorted(b for b in buffered if 2 <= b[0] - b[2] <= 3)
    assert any(int(r["staleness"]) >= 1 for r in rows)
    for r in rows:
        assert r["truth"] == "drawn" and r["examples"] == "1"
        assert r["verdict"] == "fail" and float(r["token_f1"]) >= 0.9, r
    assert "FedBuff" in (run_dir / "audit.md").read_text()
