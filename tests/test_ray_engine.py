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
