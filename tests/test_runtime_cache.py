"""The engine hands its runtime cache to the server and every client it runs."""

from pathlib import Path

from fedpeft import report
from fedpeft.clients.app import app as client_app
from fedpeft.runtime import PROCESS_RUNTIMES, RuntimeCache, get_runtime, runtimes_of
from fedpeft.server.app import app as server_app
from fedpeft.simulation import runner
from fedpeft.simulation.inprocess import run_inprocess


def test_an_engine_cache_is_the_one_the_apps_use(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg(**{"federation.rounds": 1})
    cache = RuntimeCache()
    run_dir = tmp_path / "run"
    run_inprocess(server_app, client_app, cfg.data.num_clients, runner.run_config(cfg, run_dir, False), cache)
    assert report.read_metrics(run_dir)[0]["replies"] == cfg.data.num_clients
    rt = cache.get(cfg)
    assert rt is cache.get(cfg) and rt is not get_runtime(cfg)  # built once, in the engine's cache only
    assert "model" in vars(rt)  # the server and the clients loaded the model into this cache


def test_apps_outside_an_engine_use_the_process_cache() -> None:
    class Plain:  # a Context that Flower built: no runtimes attached
        pass

    assert runtimes_of(Plain()) is PROCESS_RUNTIMES
    cache = RuntimeCache()
    holder = Plain()
    holder.runtimes = cache  # type: ignore[attr-defined]
    assert runtimes_of(holder) is cache
