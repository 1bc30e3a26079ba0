"""A personal classification head (federation.personalization = "head"): each client trains its own head on the
shared adapter; the head is in no message (checked on the serialized bytes and the layout), the federated
evaluation evaluates each client's own head, and a resumed run is exact."""

from __future__ import annotations

import pytest
from test_lora_aggregation import capture_calls
from test_personal import PATHOLOGICAL

from fedpeft import report
from fedpeft.errors import ConfigError
from fedpeft.personal import HEAD
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

HEADED = {**PATHOLOGICAL, "federation.personalization": "head"}


def test_the_head_never_leaves_the_client(tiny_cfg, monkeypatch):
    """Every client's head and head update (its node state after minus before each call) is searched for, byte for
    byte, in the instruction it received and the reply it sent (train and evaluate); the adapter's update, which
    does travel, is found by the same search."""
    from fedpeft.compression import make_codec
    from fedpeft.protocol import TRAIN, parse_reply
    from fedpeft.runtime import get_runtime

    calls = capture_calls(monkeypatch)
    cfg = tiny_cfg(**HEADED)
    rows = report.read_metrics(runner.simulate(cfg))
    layout = get_runtime(cfg).layout
    assert not [n for n in layout.names if HEAD in n] and [n for n in layout.names if ".lora_A." in n]
    assert all(r["replies"] == 3 and r["fed_eval_replies"] == 3 for r in rows)
    trained = [c for c in calls if c[0] == TRAIN]
    assert len(trained) == 6 and len(calls) == 12  # 2 rounds x 3 clients, train and evaluate
    for kind, wire, before, after, reply in calls:
        assert after and all(HEAD in k for k in after)
        for k, h in after.items():
            assert h.numpy().tobytes() not in wire
            if kind == TRAIN:
                dh = h - before[k] if k in before else h
                assert float(dh.abs().max()) > 0 and dh.numpy().tobytes() not in wire  # the head trained
        if kind == TRAIN:
            sent = make_codec("none").decode(parse_reply(reply.content)[0], layout)
            assert sent and all(v.numpy().tobytes() in wire for v in sent.values())  # the search finds what travels


def test_each_client_is_evaluated_with_its_own_head(tiny_cfg):
    """One topic per client: a shared head must serve three single-class clients, a personal one only its own."""
    headed = report.read_metrics(runner.simulate(tiny_cfg(**HEADED)))[-1]
    shared = report.read_metrics(runner.simulate(tiny_cfg(**PATHOLOGICAL)))[-1]
    assert headed["fed_eval_model"] == "personal" and shared["fed_eval_model"] == "global"
    assert len(headed["fed_eval_clients"]) == 3 and "personal_eval_accuracy" not in headed
    assert headed["fed_eval_client_mean"] > shared["fed_eval_client_mean"]
    assert headed["fed_eval_worst"] >= shared["fed_eval_worst"]
    assert headed["bytes_up"] < shared["bytes_up"]  # the head's bytes stay home


def test_a_personal_head_run_resumes_exactly(tiny_cfg, monkeypatch):
    extra = {**HEADED, "federation.rounds": 2, "federation.clients_per_round": 2}
    keys = ("train_loss", "fed_eval_loss", "fed_eval_clients", "bytes_up")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    resumed = report.read_metrics(interrupt_and_resume(tiny_cfg(**extra), 2, monkeypatch))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


@pytest.mark.parametrize("extra", [{"adapter.train_head": False}, {"federation.evaluation": "server"}])
def test_a_personal_head_refuses_what_cannot_carry_it(tiny_cfg, extra):
    with pytest.raises(ConfigError, match="federation.personalization = 'head'"):
        tiny_cfg(**{**HEADED, **extra})
