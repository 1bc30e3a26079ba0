"""Client-level DP inside the federated loop: epsilon every round, resume continues the same curve."""

import json
from pathlib import Path

import pytest
import torch

from fedpeft import report
from fedpeft.privacy import ClientLevelAccountant
from fedpeft.simulation import runner

from conftest import interrupt_and_resume

DP = {"privacy.mode": "client", "privacy.server_noise_multiplier": 0.5, "privacy.clip_norm": 0.5,
      "privacy.delta": 1e-3, "data.num_clients": 4, "federation.clients_per_round": 2, "federation.rounds": 3}


def test_client_level_dp_run_reports_epsilon_each_round(tiny_cfg):
    from fedpeft.privacy.server_dp import LEDGER_FILE

    run_dir = runner.simulate(tiny_cfg(**DP))
    rows = report.read_metrics(run_dir)
    ledger = [json.loads(line) for line in (run_dir / LEDGER_FILE).read_text().splitlines()]
    assert ledger == [{"noise_multiplier": 0.5, "sample_rate": 0.5}] * 3  # every charge, for an outside accountant
    eps = [r["epsilon_client"] for r in rows]
    # Poisson sampling: each of the 4 clients joins with q = 2/4, so the round size varies around 2
    assert all(r["replies"] == r["sampled"] and r["sample_rate"] == 0.5 for r in rows)
    assert eps == sorted(eps) and eps[0] > 0
    ref = ClientLevelAccountant("rdp")
    for _ in range(3):
        ref.step(0.5, 0.5)
    assert eps[-1] == pytest.approx(ref.epsilon(1e-3))
    assert all(r["clip_norm"] == 0.5 for r in rows)


def test_adaptive_clipping_with_compression_and_resume(tiny_cfg, monkeypatch):
    extra = {**DP, "privacy.adaptive_clip": True, "privacy.server_noise_multiplier": 0.01,
             "federation.clients_per_round": 4, "compression.uplink": "compeft:0.2"}
    keys = ("epsilon_client", "clip_norm", "eval_loss", "train_loss")
    full = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    assert len({r["clip_norm"] for r in full}) == 3  # the clip norm moves every round

    run_dir = interrupt_and_resume(tiny_cfg(**extra), 3, monkeypatch)
    assert [[r[k] for k in keys] for r in report.read_metrics(run_dir)] == [[r[k] for k in keys] for r in full]


@pytest.mark.parametrize("mode, key", [("client", "epsilon_client"), ("distributed", "epsilon_distributed")])
def test_a_target_epsilon_run_ends_at_its_target(tiny_cfg, mode, key):
    # client-level / distributed DP take their noise from privacy.target_epsilon (before: ignored, z stayed the
    # given 0.5 and this run ended at epsilon 10.8 / 37.5); the accountant's last epsilon is the target within 1 %
    extra = {**DP, "privacy.mode": mode, "privacy.target_epsilon": 3.0, "federation.rounds": 2}
    if mode == "distributed":
        extra.update({"privacy.secure_aggregation": "secaggplus", "privacy.secagg_min_survivors": 2})
    cfg = tiny_cfg(**extra)
    assert cfg.privacy.server_noise_multiplier != DP["privacy.server_noise_multiplier"]  # replaced
    run_dir = runner.simulate(cfg)
    rows = report.read_metrics(run_dir)
    assert len(rows) == 2 and 2.97 <= rows[-1][key] <= 3.0
    summary = (run_dir / "summary.md").read_text()
    assert f"{key} {report.fmt(rows[-1][key])}" in summary and "derived from target epsilon 3 over 2" in summary
    assert "exceeded" not in summary
    from fedpeft.privacy.statement import guarantee_lines

    over = "\n".join(guarantee_lines(cfg, [*rows, {**rows[-1], key: 3.5}]))  # e.g. a round more than planned
    assert "**exceeded** (epsilon 3.5)" in over


@pytest.mark.parametrize("adapter", ["lora", "prefix", "prompt"])
def test_local_dp_sgd_run_accounts_every_round(tiny_cfg, adapter):
    extra = {"privacy.mode": "both", "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0,
             "privacy.delta": 1e-3, "federation.rounds": 2, "adapter.type": adapter,
             "privacy.server_noise_multiplier": 0.3, "privacy.release_client_metrics": True}
    rows = report.read_metrics(runner.simulate(tiny_cfg(**extra)))
    assert all(r["replies"] == 3 for r in rows)
    assert 0 < rows[0]["epsilon_local"] < rows[1]["epsilon_local"]  # the client's accountant spans rounds
    assert rows[1]["epsilon_client"] > rows[0]["epsilon_client"]


def test_local_dp_refuses_unsupported_adapters(tiny_cfg):
    from fedpeft.errors import ConfigError
    with pytest.raises(ConfigError, match="local DP-SGD supports adapter.type"):
        tiny_cfg(**{"privacy.mode": "local", "adapter.type": "ia3"})


def test_clip_count_noise_lifts_the_adaptive_clipping_client_minimum(tiny_cfg):
    """4 clients per round, z = 1: the default count noise (m/20 = 0.2) is refused, 0.6 runs."""
    from fedpeft.errors import PrivacyError
    extra = {**DP, "privacy.adaptive_clip": True, "privacy.server_noise_multiplier": 1.0,
             "federation.clients_per_round": 4, "federation.rounds": 2}
    with pytest.raises(PrivacyError, match="clip_count_noise"):
        runner.simulate(tiny_cfg(**extra))
    rows = report.read_metrics(runner.simulate(tiny_cfg(**extra, **{"privacy.clip_count_noise": 0.6})))
    assert len(rows) == 2 and rows[1]["clip_norm"] != rows[0]["clip_norm"]


@pytest.mark.parametrize("mode", ["local", "client"])
def test_under_dp_clients_send_no_values_of_their_data_unless_opted_in(tiny_cfg, mode):
    """Train loss, example count, steps, timings and local epsilon depend on a client's data: under DP they stay
    on the client (weight 1 each) and metrics.jsonl has no train loss, unless privacy.release_client_metrics."""
    extra = {"privacy.mode": mode, "privacy.noise_multiplier": 1.0, "privacy.delta": 1e-3, "federation.rounds": 1,
             "privacy.server_noise_multiplier": 0.3}
    seen = []
    rows = report.read_metrics(runner.simulate(tiny_cfg(**extra), observers=[seen.append]))
    assert seen and all(set(u.metrics) <= {"num-examples", "partition-id", "clip-indicator"} for u in seen)
    assert all(u.metrics["num-examples"] == 1 for u in seen)
    assert rows[0]["train_loss"] is None and "epsilon_local" not in rows[0]
    seen.clear()
    rows = report.read_metrics(runner.simulate(tiny_cfg(**extra, **{"privacy.release_client_metrics": True}),
                                               observers=[seen.append]))
    assert all(u.metrics["num-examples"] > 1 and "train-loss" in u.metrics for u in seen)
    assert rows[0]["train_loss"] is not None and (mode == "client" or rows[0]["epsilon_local"] > 0)


def test_the_summary_gives_the_largest_local_epsilon_of_the_run(tmp_path):
    """Each row's epsilon_local is the largest among that round's clients; the summary's final value is the
    run's largest (it was the last round's, lower when the most-charged client sat the last round out)."""
    import json

    from fedpeft import config

    cfg = config.load(None, ['privacy.mode="local"', "output.plots=false"])
    rows = [{"round": r, "replies": 2, "seconds": 1.0, "epsilon_local": e} for r, e in enumerate([4.81, 9.68, 7.45], 1)]
    (tmp_path / report.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_run_report(tmp_path, cfg)
    final = next(line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("- final:"))
    assert final == f"- final: epsilon_local {report.fmt(9.68)}"


def test_under_client_level_dp_a_round_below_the_quorum_still_releases_the_noise(tiny_cfg, monkeypatch):
    """Whether the adapter moves must not depend on who took part: with every client failing, each round
    releases the noise alone (before: the round was skipped, the adapter stayed, and an observer of the
    adapters learnt that fewer than min_clients updates arrived, which the accountant never charged)."""
    from fedpeft.clients.app import app as client_app
    from fedpeft.errors import FedPeftError

    def call(self, message, context):
        raise RuntimeError("this client's data loader failed")

    monkeypatch.setattr(type(client_app), "__call__", call)
    cfg = tiny_cfg(**{**DP, "federation.min_clients": 2})
    with pytest.raises(FedPeftError, match=r"no client update was applied in rounds 1-3, the global adapter holds "
                                           r"no client's update \(only DP noise\): 0 valid updates: client-level "
                                           r"DP released the noise alone \(3x"):
        runner.simulate(cfg)
    (run_dir,) = Path(cfg.output.dir).iterdir()
    rows = report.read_metrics(run_dir)
    assert len(rows) == 3 and all(r["replies"] == 0 for r in rows)
    assert len({r["eval_loss"] for r in rows}) == 3  # the adapter moved every round: noise, charged
    assert rows[0]["epsilon_client"] < rows[1]["epsilon_client"] < rows[2]["epsilon_client"]


def test_under_client_level_dp_the_relative_norm_screen_is_off(tiny_cfg):
    """Found by an outside review: the screen's limit (norm_multiple x the round's median norm) comes from the
    other clients' updates, so adding one client could decide whether another's clipped update was in the noised
    sum (released sum moved by 1.56 C in their example). Under client-level DP only the absolute bound screens."""
    strict = {**DP, "federation.clients_per_round": 4, "federation.rounds": 1, "sanity.norm_multiple": 1.5}
    plain = report.read_metrics(runner.simulate(tiny_cfg(**{**strict, "privacy.mode": "none"})))
    assert plain[0]["sanity_dropped"] >= 1  # the same round without DP: the relative screen drops updates
    rows = report.read_metrics(runner.simulate(tiny_cfg(**strict)))
    assert rows[0]["sampled"] == rows[0]["replies"] == 4 and rows[0]["sanity_dropped"] == 0


def _noise(server, shape=(64,)):
    return server.aggregate([], {"w": torch.zeros(shape)})["w"]


def test_outside_simulations_the_server_noise_is_not_derived_from_run_seed(tiny_cfg):
    """Found by an outside review: the noise generator was seeded from run.seed (in config.toml) in deployments
    too, so anyone holding the adapters and the config could regenerate the noise and read the clipped sum."""
    from fedpeft.privacy.server_dp import ServerPrivacy

    cfg = tiny_cfg(**DP)
    seeded = [_noise(ServerPrivacy(cfg, seeded=True)) for _ in range(2)]
    assert torch.equal(*seeded)  # simulations: reproducible
    deployed = [_noise(ServerPrivacy(cfg)) for _ in range(2)]
    assert not torch.equal(*deployed) and not torch.equal(deployed[0], seeded[0])


@pytest.mark.parametrize("seeded", [False, True])
def test_a_resume_charges_the_releases_made_after_the_checkpoint_unless_they_replay(tiny_cfg, tmp_path, seeded):
    """Rounds released after the checkpoint and released again by the resumed run are two releases in a deployment
    (fresh noise, both charged: the ledger holds the lost ones); a simulation replays them with the same noise, so
    its ledger is cut back and the epsilon curve continues as before."""
    from fedpeft.privacy.server_dp import LEDGER_FILE, ServerPrivacy

    cfg, ledger = tiny_cfg(**DP), tmp_path / LEDGER_FILE
    first = ServerPrivacy(cfg, seeded=seeded, ledger=ledger)
    for _ in range(2):
        first.end_round([])
    meta, tensors = first.state()
    assert meta["ledger_entries"] == 2
    lost = _noise(first)
    for _ in range(2):  # released, then the server crashed before the next checkpoint
        first.end_round([])
    resumed = ServerPrivacy(cfg, seeded=seeded, ledger=ledger)
    resumed.restore(meta, tensors)
    assert torch.equal(_noise(resumed), lost) == seeded  # a deployment never reuses the lost rounds' noise
    resumed.end_round([])
    charged = 3 if seeded else 5
    ref = ClientLevelAccountant("rdp")
    for _ in range(charged):
        ref.step(DP["privacy.server_noise_multiplier"], 0.5)
    assert resumed.accountant.rounds == charged
    assert resumed.accountant.epsilon(1e-3) == pytest.approx(ref.epsilon(1e-3))
    assert len(ledger.read_text().splitlines()) == charged


def test_a_deployed_node_never_seeds_its_dp_noise_whatever_the_run_config_says():
    """Found by an outside review: the run config's simulation flag, which the server sets, seeded each client's
    DP-SGD noise from values the server knows. A node started by fedpeft node says deployed=true in its node config
    (which the server cannot change), and then never seeds."""
    from flwr.app import Context, RecordDict

    from fedpeft.clients.app import _simulated

    def context(**node_config):
        return Context(run_id=1, node_id=5, node_config={"partition-id": 0, **node_config}, state=RecordDict(),
                       run_config={"simulation": True})

    assert _simulated(context()) and not _simulated(context(deployed=True))


def test_a_node_refuses_federated_evaluation_that_dp_keeps_on_the_node(tiny_cfg, tmp_path):
    """The server refuses federated evaluation under DP without release_client_metrics; a node does not rely on it."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.clients.app import evaluate
    from fedpeft.errors import PrivacyError

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # a Message needs them (Flower 1.41)
    cfg = tiny_cfg(**DP)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config=runner.run_config(cfg, tmp_path, False))
    with pytest.raises(PrivacyError, match="federated evaluation under DP sends this node's exact evaluation counts"):
        evaluate(Message(RecordDict(), dst_node_id=5, message_type="evaluate"), ctx)


def _with_node_config(monkeypatch, **node_config):
    """The in-process engine's nodes with extra node config entries (what fedpeft node sets on a real node)."""
    from fedpeft.simulation.inprocess import InProcessGrid

    original = InProcessGrid.context

    def context(self, node):
        ctx = original(self, node)
        ctx.node_config.update(node_config)
        return ctx

    monkeypatch.setattr(InProcessGrid, "context", context)


def test_a_node_with_a_privacy_limit_trains_only_under_dp_sgd_within_it(tiny_cfg, monkeypatch):
    """A node's own limit (fedpeft node --max-epsilon, node config max-epsilon): the server's run configuration
    can neither turn DP-SGD off for it nor spend more than the limit."""
    from fedpeft.errors import FedPeftError

    local = {"privacy.mode": "local", "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0,
             "privacy.delta": 1e-3, "federation.rounds": 2, "train.local_steps": 2, "data.num_clients": 2}
    _with_node_config(monkeypatch, **{"max-epsilon": 50.0})
    rows = report.read_metrics(runner.simulate(tiny_cfg(**local)))
    assert [r["replies"] for r in rows] == [2, 2]  # within the limit
    with pytest.raises(FedPeftError, match=r"this node trains only under record-level DP-SGD within epsilon 50 "
                                           r"\(node config max-epsilon\); the run's privacy.mode = 'none'"):
        runner.simulate(tiny_cfg(**{**local, "privacy.mode": "none"}))
    _with_node_config(monkeypatch, **{"max-epsilon": 0.5})
    with pytest.raises(FedPeftError, match=r"this node's privacy limit: 2 more DP-SGD steps would take its epsilon "
                                           r"to .*, above its max-epsilon 0.5"):
        runner.simulate(tiny_cfg(**local))
