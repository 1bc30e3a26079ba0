"""Step progress inside a round (``fedpeft simulate``): where the run is, an ETA, and no effect on results."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from fedpeft.progress import StepProgress, clock_text, console_progress

from conftest import tiny_overrides


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _client(p: StepProgress, clock: Clock, rnd: int, index: int, count: int, steps: int, step_s: float,
            setup_s: float = 0.0) -> None:
    """One client of a round: announced, ``setup_s`` before its first step, then ``steps`` steps."""
    p.begin(rnd, "train", index, count)
    clock.now += setup_s
    p.step(0, steps)
    for done in range(1, steps + 1):
        clock.now += step_s
        p.step(done, steps)


def test_eta_counts_measured_step_time_and_later_rounds_by_the_last_round() -> None:
    clock, lines = Clock(), []
    p = StepProgress(3, lines.append, live=False, every=1e9, clock=clock)
    _client(p, clock, 1, 0, 4, 10, 2.0, setup_s=30.0)  # the set-up (loading, tokenizing) is not a step
    # the first client's last step: 3 clients x 10 steps x 2 s left in the round; later rounds 4 x 10 x 2 s
    assert lines == ["round 1/3 · client 1/4 · step 10/10 · ETA round 1:00 · run 3:40"]
    p.begin(1, "train", 1, 4)
    p.step(0, 10)
    clock.now += 4.0
    p.step(1, 10)  # mean step now (20 + 4) / 11 s
    assert p.eta() == pytest.approx((29 * 24 / 11, 29 * 24 / 11 + 2 * 40 * 24 / 11))
    for i in (1, 2, 3):
        _client(p, clock, 1, i, 4, 10, 2.0)
    clock.now += 50.0  # the server aggregates and evaluates
    _client(p, clock, 2, 0, 4, 10, 2.0)
    round_1 = clock.now - 20.0 - p.round_started[1]
    assert p.last_round_seconds == pytest.approx(round_1)  # from round 1's first message to round 2's
    left = p.eta()
    assert left is not None and left[1] == pytest.approx(left[0] + round_1)  # one more round, as long as round 1
    assert lines[-1].startswith("round 2/3 · client 1/4 · step 10/10 · ETA round ")


def test_plain_lines_once_per_client_and_every_few_seconds_in_between() -> None:
    clock, lines = Clock(), []
    p = StepProgress(1, lines.append, live=False, every=15.0, clock=clock)
    _client(p, clock, 1, 0, 2, 20, 1.0)  # 20 s of steps: one line at 15 s, one at the end
    assert [line.split(" · ")[2] for line in lines] == ["step 15/20", "step 20/20"]
    p.begin(1, "evaluate", 0, 2)  # federated evaluation: no steps, no ETA
    assert p.line() == "round 1/1 · evaluating client 1/2"
    late, lines = StepProgress(1, lines.append, live=False, every=15.0, clock=clock), []
    late.emit = lines.append
    clock.now += 60.0  # loading the model took longer than `every`: the start of the steps is no news
    late.begin(1, "train", 0, 2)
    late.step(0, 4)
    assert lines == []


def test_live_line_is_rewritten_at_most_four_times_a_second() -> None:
    clock, lines = Clock(), []
    p = StepProgress(2, lines.append, live=True, clock=clock)
    p.begin(1, "train", 0, 3)
    assert lines == ["round 1/2 · client 1/3"]  # a live line shows the client before its first step
    p.step(0, 100)
    for done in range(1, 101):
        clock.now += 0.0625  # exact in binary: every 4th step is 0.25 s after the last rewrite
        p.step(done, 100)
    assert len(lines) == 1 + 25  # the client's line, then every 4th step
    assert lines[-1].split(" · ")[2] == "step 100/100"


def test_console_progress_writes_into_the_spinner_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with console.status("loading") as status:
        p = console_progress(console, status, 2)
        assert p.live
        p.begin(1, "train", 0, 2)
        assert "round 1/2 · client 1/2" in str(status.renderable.text)  # type: ignore[attr-defined]
    assert not console_progress(Console(file=io.StringIO()), status, 2).live  # not a terminal: plain lines
    assert clock_text(41) == "0:41" and clock_text(3725) == "1:02:05"


TIMINGS = ("seconds", "elapsed", "peak_rss_mb", "encode_ms", "decode_ms")


def _simulate(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, Path]:
    from fedpeft.cli import main

    assert main(argv) == 0
    out, err = capsys.readouterr()
    return err, Path(json.loads(out.strip().splitlines()[-1])["run_dir"])


def _results(run_dir: Path) -> tuple[list[dict], bytes]:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, (run_dir / "checkpoint" / "global.safetensors").read_bytes()


def test_simulate_shows_each_clients_steps_and_quiet_shows_none_with_identical_results(
        cls_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    sets = tiny_overrides(cls_data, tmp_path / "runs", **{"federation.rounds": 2, "data.num_clients": 2,
                                                          "train.local_steps": 4})
    argv = ["simulate", *[a for s in sets for a in ("--set", s)]]
    err, shown = _simulate(argv, capsys)
    steps = [line for line in err.splitlines() if " · step " in line]
    assert [line.split(" · ETA ")[0] for line in steps] == [
        f"round {r}/2 · client {c}/2 · step 4/4" for r in (1, 2) for c in (1, 2)], err
    assert all(" · ETA round " in line and " · run " in line for line in steps)
    assert "round 2/2 | clients 2/2" in err  # the per-round lines are still there
    err, quiet = _simulate([*argv, "-q"], capsys)
    assert " · step " not in err and "round 1/2 |" not in err and "run directory" not in err
    assert f"run {quiet.name}" in err  # the summary table
    assert _results(shown) == _results(quiet)  # metrics and the final adapter, bit for bit


# ---- the Python API and the Ray engine -----------------------------------------------------------------------

def test_api_progress_shows_steps_and_rounds_and_changes_no_result(
        tiny_cfg, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    import fedpeft

    cfg = tiny_cfg(**{"federation.rounds": 2, "data.num_clients": 2, "train.local_steps": 4})
    lines: list[str] = []
    to_function = fedpeft.simulate(cfg, progress=lines.append)
    steps = [line.split(" · ETA ")[0] for line in lines if " · step " in line]
    assert steps == [f"round {r}/2 · client {c}/2 · step 4/4" for r in (1, 2) for c in (1, 2)], lines
    assert sum(line.startswith("round 2/2 | clients 2/2") for line in lines) == 1  # the round lines too
    capsys.readouterr()
    on_stderr = fedpeft.simulate(cfg, progress=True)
    err = capsys.readouterr().err
    assert "round 1/2 · client 2/2 · step 4/4 · ETA round" in err and "round 2/2 | clients 2/2" in err
    silent = fedpeft.simulate(cfg)
    assert capsys.readouterr().err == ""  # off by default
    assert _results(to_function.run_dir) == _results(on_stderr.run_dir) == _results(silent.run_dir)


def _event(t: float, rnd: int, node: int, step: int, steps: int = 10) -> dict:
    return {"round": rnd, "node": node, "step": step, "steps": steps, "t": t}


def test_parallel_progress_counts_all_clients_steps_and_times_the_round_by_wall_time() -> None:
    from fedpeft.progress import ParallelProgress

    clock, lines = Clock(), []
    p = ParallelProgress(3, lines.append, live=False, every=1e9, clock=clock)
    p.feed({"round": 1, "kind": "train", "count": 4, "t": 100.0})
    for node in (1, 2):  # two actors at once; each step takes them 2 s: one step per second together
        p.feed(_event(130.0, 1, node, 0))  # 30 s of set-up before the first step is not step time
    for i in range(1, 11):
        for node in (1, 2):
            p.feed(_event(130.0 + 2 * i, 1, node, i))
    assert p.rate() == pytest.approx(20 / 20)  # wall seconds per client step, the actors together
    assert lines[-1] == "round 1/3 · 2/4 clients done · 0 training · steps 20/40 · ETA round 0:20 · run 1:40"
    p.feed(_event(150.0, 1, 3, 0))
    p.feed(_event(160.0, 1, 3, 5))
    assert p.line().startswith("round 1/3 · 2/4 clients done · 1 training · steps 25/40")
    p.feed({"round": 1, "kind": "evaluate", "count": 4, "t": 180.0})  # same round: its start is kept
    assert p.line() == "round 1/3 · evaluating on 4 client(s)"
    p.feed({"round": 2, "kind": "train", "count": 4, "t": 190.0})
    assert p.last_round_seconds == pytest.approx(90.0) and p.rate() == pytest.approx(30 / 25)
    p.feed(_event(191.0, 1, 4, 10))  # a late event of the last round changes nothing
    p.feed(_event(200.0, 2, 1, 0))
    p.feed(_event(201.2, 2, 1, 1))
    left = p.eta()
    assert left is not None and left[1] == pytest.approx(left[0] + 90.0)  # one more round, as long as round 1


def test_events_from_other_processes_reach_the_display_and_the_file_is_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from fedpeft.progress import PROGRESS_KEY, ParallelProgress, append_event, following_events, step_writer

    events, lines = tmp_path / "progress.jsonl", []
    p = ParallelProgress(1, lines.append, live=False, every=1e9)
    writer = ("import sys; from fedpeft.progress import step_writer\n"
              f"hook = step_writer({{{PROGRESS_KEY!r}: sys.argv[1]}}, 1, int(sys.argv[2]))\n"
              "[hook(i, 50) for i in range(51)]")
    with following_events(events, p, poll=0.05):
        append_event(events, {"round": 1, "kind": "train", "count": 2, "t": 0.0})
        procs = [subprocess.Popen([sys.executable, "-c", writer, str(events), str(n)]) for n in (7, 8)]
        assert [proc.wait() for proc in procs] == [0, 0]
    assert not events.exists()
    # each process wrote its first and last step (the ones between are throttled to one per 0.5 s)
    assert lines[-1].startswith("round 1/1 · 2/2 clients done · 0 training · steps 100/100"), lines
    assert step_writer({}, 1, 1) is None and step_writer({PROGRESS_KEY: ""}, 1, 1) is None  # no progress asked


@pytest.mark.slow
def test_ray_actors_steps_reach_the_drivers_display(tiny_cfg) -> None:
    pytest.importorskip("ray", reason="the ray engine needs: pip install 'fedpeft[ray]'")
    import fedpeft

    cfg = tiny_cfg(**{"federation.rounds": 2, "run.threads": 1, "train.local_steps": 4})
    lines: list[str] = []
    result = fedpeft.simulate(cfg, engine="ray", progress=lines.append)
    for rnd in (1, 2):  # every client's last step came from its actor, through the run directory
        assert any(line.startswith(f"round {rnd}/2 · 3/3 clients done · 0 training · steps 12/12") for line in lines), \
            lines
    assert sum(line.startswith("round 2/2 | clients 3/3") for line in lines) == 1
    assert not (result.run_dir / "progress.jsonl").exists()
