"""The Ray engine: a real flower-superlink --simulation process, Ray actors, the same ServerApp/ClientApp."""

import pytest

from fedpeft import report
from fedpeft.simulation import runner

pytest.importorskip("ray", reason="the ray engine needs: pip install 'fedpeft[ray]'")


@pytest.mark.slow
def test_ray_engine_matches_the_inprocess_engine(tiny_cfg):
    cfg = tiny_cfg(**{"federation.rounds": 2, "run.threads": 1})
    ray_rows = report.read_metrics(runner.simulate(cfg, engine="ray"))
    local_rows = report.read_metrics(runner.simulate(cfg, engine="inprocess"))
    assert [r["replies"] for r in ray_rows] == [3, 3]
    for a, b in zip(ray_rows, local_rows):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
        assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=0.02)
        assert a["bytes_up"] == b["bytes_up"]


@pytest.mark.slow
def test_a_failed_ray_run_names_its_cause_and_keeps_its_log(tiny_cfg, cls_data):
    from fedpeft.errors import FedPeftError

    cfg, run_dir = runner.prepare(tiny_cfg(**{"federation.rounds": 1, "run.threads": 1}))
    cls_data.unlink()  # the ServerApp, inside Flower's simulation process, cannot read the data
    with pytest.raises(FedPeftError, match="finished:failed") as err:
        runner.execute(cfg, run_dir, engine="ray")
    assert str(cls_data) in str(err.value)  # the cause from the ServerApp's own log, not polling lines
    kept = (run_dir / "flower.log").read_text()
    assert str(cls_data) in kept and "# flower-superlink" in kept


def test_resource_requests_the_machine_cannot_meet_are_refused_up_front(tiny_cfg):
    from fedpeft.errors import FedPeftError
    from fedpeft.simulation.ray import check_resources

    with pytest.raises(FedPeftError, match="no CUDA GPU; set federation.ray_num_gpus = 0"):
        check_resources(tiny_cfg(**{"federation.ray_num_gpus": 0.25}), cpus=2, gpus=0)
    with pytest.raises(FedPeftError, match="has 1 GPU"):
        check_resources(tiny_cfg(**{"federation.ray_num_gpus": 2}), cpus=2, gpus=1)
    with pytest.raises(FedPeftError, match="ray_num_cpus = 4 per client, but this machine has 2 CPU"):
        check_resources(tiny_cfg(**{"federation.ray_num_cpus": 4}), cpus=2, gpus=0)
    check_resources(tiny_cfg(**{"federation.ray_num_gpus": 0.25}), cpus=2, gpus=1)  # a GPU share that fits
