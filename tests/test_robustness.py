"""Bad input: malformed client replies are dropped and logged, the round goes on; CLI errors are clean."""

import logging
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedpeft import protocol, report
from fedpeft.clients.app import app as client_app
from fedpeft.simulation import runner


def _replace_payload(reply: Message, request: Message, edit) -> Message:
    payload = protocol.record_payload(reply.content[protocol.UPDATE])
    data = edit(bytearray(protocol.pack_payload(payload)))
    array = Array(dtype="uint8", shape=(len(data),), stype="raw", data=bytes(data))
    content = RecordDict({protocol.UPDATE: ArrayRecord({protocol.PAYLOAD: array}),
                          protocol.METRICS: reply.content[protocol.METRICS]})
    return Message(content, reply_to=request)


def _corrupt_buffer(reply: Message) -> Message:
    def absurd_header(data: bytearray) -> bytearray:
        data[12:12 + 8 * 4] = np.full(4, np.iinfo(np.int64).max, dtype="<i8").tobytes()  # counts and lengths
        return data
    return _replace_payload(reply, _corrupt_buffer.request, absurd_header)


def _truncate(reply: Message) -> Message:
    return _replace_payload(reply, _truncate.request, lambda data: data[: len(data) // 2])


def _nan_metric(reply: Message) -> Message:
    content = RecordDict({protocol.UPDATE: reply.content[protocol.UPDATE],
                          protocol.METRICS: MetricRecord({"num-examples": 10.0, "train-loss": float("nan")})})
    return Message(content, reply_to=_nan_metric.request)


def _extra_record(reply: Message) -> Message:
    content = RecordDict({**reply.content, "smuggled": ArrayRecord({"x": Array(np.zeros(3))})})
    return Message(content, reply_to=_extra_record.request)


@pytest.mark.parametrize("mangle, reason, codec", [
    (_corrupt_buffer, "dropped the update of node 1001", "none"),
    (_corrupt_buffer, "dropped the update of node 1001", "compeft:0.2"),
    (_truncate, "dropped the update of node 1001", "compeft:0.2"),
    (_nan_metric, "must be a finite number", "none"),
    (_extra_record, "must hold exactly", "none")])
def test_a_malformed_reply_is_dropped_logged_and_the_round_goes_on(tiny_cfg, monkeypatch, caplog, mangle, reason,
                                                                   codec):
    original = type(client_app).__call__

    def call(self, message, context):
        reply = original(self, message, context)
        if message.metadata.dst_node_id == 1001:
            mangle.request = message
            return mangle(reply)
        return reply

    monkeypatch.setattr(type(client_app), "__call__", call)
    caplog.set_level(logging.WARNING)
    rows = report.read_metrics(runner.simulate(tiny_cfg(**{"federation.rounds": 1, "compression.uplink": codec})))
    assert [(r["replies"], r["dropped"]) for r in rows] == [(2, 1)]
    assert rows[-1]["eval_loss"] is not None
    assert reason in caplog.text


def test_a_crashing_client_is_an_error_reply_not_a_crash(tiny_cfg, monkeypatch, caplog):
    original = type(client_app).__call__

    def call(self, message, context):
        if message.metadata.dst_node_id == 1002:
            raise RuntimeError("out of memory on this node")
        return original(self, message, context)

    monkeypatch.setattr(type(client_app), "__call__", call)
    caplog.set_level(logging.WARNING)  # what `fedpeft simulate` shows without -v: one line, no traceback
    rows = report.read_metrics(runner.simulate(tiny_cfg(**{"federation.rounds": 1})))
    assert (rows[0]["replies"], rows[0]["dropped"]) == (2, 1)
    assert [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()] == [
        "round 1: node 1002 failed: RuntimeError: out of memory on this node"]
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert rows[0]["dropped_nodes"] == {"1002": "failed: RuntimeError: out of memory on this node"}  # any run


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedpeft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["simulate", "--set", "federation.roundz=2"], "unknown key federation.roundz"),
    (["simulate", "missing.toml"], "scenario file not found: missing.toml"),
    (["simulate", "--set", "data.source=file", "--set", "data.path=/no/such.jsonl"], "/no/such.jsonl"),
    (["simulate", "--set", "model.name=no-such/model", "--set", "data.source=file", "--set", "data.path=DATA"],
     "cannot load model 'no-such/model'"),
    (["simulate", "--resume", "/no/run"], "not a run directory"),
])
def test_cli_errors_print_a_message_not_a_traceback(args, message, cls_data, tmp_path):
    args = [a.replace("DATA", str(cls_data)) for a in args]
    res = _cli(*args, "--set", f"output.dir={tmp_path}" if "--resume" not in args else "run.seed=0", cwd=tmp_path) \
        if "--resume" not in args else _cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_simulate_end_to_end(cls_data, tmp_path):
    from conftest import tiny_overrides
    sets = [x for s in tiny_overrides(cls_data, tmp_path / "runs", **{"federation.rounds": 2}) for x in ("--set", s)]
    res = _cli("simulate", *sets, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "round 2/2" in res.stderr and "eval acc" in res.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert len(report.read_metrics(run_dir)) == 2 and (run_dir / "adapter" / "adapter_config.json").exists()


def test_cli_config_prints_the_resolved_toml():
    res = _cli("config", "--set", "federation.rounds=9")
    assert res.returncode == 0 and "rounds = 9" in res.stdout


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d[:5], "shorter than its 12-byte preamble"),
    (lambda d: d + b"x", "add up to"),
    (lambda d: np.array([7, 0, 0], "<u4").tobytes() + bytes(7), "not a whole number"),
])
def test_packed_payload_framing_is_validated(edit, reason):
    import torch

    from fedpeft.compression import Layout, make_codec
    from fedpeft.errors import PayloadError

    state = {"w": torch.randn(4, 4)}
    data = protocol.pack_payload(make_codec("compeft:0.5").encode(state, Layout.from_state(state)))
    with pytest.raises(PayloadError, match=reason):
        protocol.unpack_payload(edit(data))


def test_a_payload_array_that_is_not_raw_bytes_is_refused():
    from fedpeft.errors import PayloadError

    with pytest.raises(PayloadError, match="exactly one array"):
        protocol.record_payload(ArrayRecord({"header": Array(np.zeros(3, np.int64))}))
    with pytest.raises(PayloadError, match="not raw uint8"):
        protocol.record_payload(ArrayRecord({protocol.PAYLOAD: Array(np.zeros(3, np.int64))}))


def test_sampling_keeps_64_bit_node_ids_exact(tiny_cfg, tmp_path):
    """Real node ids are random uint64s; mixing ids above and below 2**63 must not turn them into floats."""
    from fedpeft.server.loop import FederatedServer

    ids = [2**64 - 59, 3, 2**63 + 7, 12_345_678_901_234_567]

    class Nodes:
        def get_node_ids(self):
            return ids

    server = FederatedServer(tiny_cfg(**{"data.num_clients": 4, "federation.clients_per_round": 3}), tmp_path)
    for rnd in (1, 2, 3):
        sampled = server._sample(Nodes(), rnd)
        assert len(sampled) == 3 and set(sampled) <= set(ids)


@pytest.mark.parametrize("metrics, why", [
    ({"num-examples": 2**70}, "must be a positive integer"),  # in-process ints are not bounded by protobuf
    ({"num-examples": 10, "train-loss": 10**400}, "finite number"),  # too large for a float
    ({"num-examples": True}, "finite number"),
    ({"num-examples": 10, "clip-indicator": 0.5}, "clip-indicator must be 0 or 1"),
    ({"num-examples": 10, "clip-indicator": 2.0}, "clip-indicator must be 0 or 1"),
    ({"train-loss": 0.5}, "lack 'num-examples'")])
def test_reply_metrics_are_finite_numbers_and_a_clip_indicator_is_0_or_1(metrics, why):
    """A clip indicator of 0.5 passed every reply check and stopped the run in the clipper, after the round's
    adapter had been applied; an int too large for a float raised TypeError past the reply's error handling."""
    with pytest.raises(protocol.PayloadError, match=why):
        protocol.parse_metrics(metrics)
    assert protocol.parse_metrics({"num-examples": 10, "clip-indicator": 1}) == {"num-examples": 10.0,
                                                                                 "clip-indicator": 1.0}
    with pytest.raises(protocol.PayloadError, match="finite"):
        protocol.parse_evaluate_reply(RecordDict({protocol.METRICS: MetricRecord(
            {"num-examples": 4.0, "eval-weight": 4.0, "eval-loss-sum": 2**1100, "eval-correct": 3.0})}), True)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_ctrl_c_names_a_resume_only_when_there_is_a_checkpoint(cls_data, tmp_path, monkeypatch, capsys, checkpointed):
    """Ctrl-C in round 1 printed "continue with: fedpeft simulate --resume RUN", and that resume then failed: there
    was no checkpoint yet."""
    from fedpeft import cli

    from conftest import tiny_overrides

    def interrupt(cfg, run_dir, **kwargs):
        if checkpointed:
            (run_dir / "checkpoint").mkdir()
            (run_dir / "checkpoint" / "manifest.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute", interrupt)
    sets = [x for s in tiny_overrides(cls_data, tmp_path / "runs") for x in ("--set", s)]
    assert cli.main(["simulate", "--quiet", *sets]) == 130
    err = capsys.readouterr().err
    assert ("continue with: fedpeft simulate --resume" in err) == checkpointed
    assert ("before the first checkpoint: nothing to resume" in err) != checkpointed
