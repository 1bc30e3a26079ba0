"""``fedpeft audit``: grid parsing, verdicts on cells whose answer is known, and the CLI end to end.

Victims are tiny-llama clients (simulations/privacy-audit.toml) trained by the real local loop,
encoded by the real codecs, with Opacus DP-SGD and its accountant for the DP cells.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from fedpeft import cli, config
from fedpeft.audit import run as audit
from fedpeft.audit.grid import parse_grid
from fedpeft.errors import ConfigError

SCENARIO = Path(__file__).resolve().parents[1] / "simulations" / "privacy-audit.toml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster


def _cfg(tmp_path: Path, *sets: str) -> config.Config:
    return config.load(SCENARIO, [f'output.dir="{tmp_path}"', "audit.grad_match_iterations=30", "audit.seeds=1",
                                  *sets])


def test_grid_parsing_keeps_codec_options_and_set_splits() -> None:
    axes = parse_grid(["batch_size=1,4", "codec=none,compeft:0.05,scale=std", "dp=none,local:eps=8"])
    assert axes == {"batch_size": [1, 4], "codec": ["none", "compeft:0.05,scale=std"], "dp": ["none", "local:eps=8"]}
    assert parse_grid(["rank=4", "8"]) == {"rank": [4, 8]}  # what `--set audit.grid=rank=4,8` produces


@pytest.mark.parametrize("entry, words", [
    ("batchsize=1,4", ["batchsize", "batch_size", "dp", "observed"]),
    ("dp=local:0", ["dp", "> 0"]),
    ("dp=laplace:1", ["dp", "local:Z"]),
    ("codec=zip:9", ["zip", "compeft"]),
    ("round=third", ["first", "later"]),
    ("rank=", ["no values"]),
])
def test_bad_grid_specs_name_the_problem(tmp_path: Path, entry: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        audit.check(_cfg(tmp_path), [entry])
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unreachable_target_epsilon_and_unknown_attack_fail_before_work(tmp_path: Path) -> None:
    from fedpeft.errors import PrivacyError

    with pytest.raises(PrivacyError, match="unreachable"):
        audit.check(_cfg(tmp_path), ["dp=local:eps=1e-9"])
    with pytest.raises(ConfigError, match="grad_match"):
        audit.check(_cfg(tmp_path), attacks=["dager"])
    assert not any(tmp_path.iterdir())


def test_binomial_tail_and_tied_canary_exposure() -> None:
    assert audit.binomial_tail(0, 10, 0.1) == 1.0
    assert audit.binomial_tail(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    exact = sum(math.comb(40, k) * 0.3 ** k * 0.7 ** (40 - k) for k in range(15, 41))
    assert audit.binomial_tail(15, 40, 0.3) == pytest.approx(exact, rel=1e-12)
    # thousands of trials (a frontier cell's distinct tokens): C(n, k) alone overflows a float
    assert audit.binomial_tail(2000, 4000, 0.5) == pytest.approx(0.5 + math.comb(4000, 2000) / 2 ** 4001,
                                                                 rel=1e-9)
    assert audit.binomial_tail(900, 4000, 0.1) < 1e-100 and 1 - 1e-7 < audit.binomial_tail(300, 4000, 0.1) < 1
    assert audit.binomial_tail(5, 4, 0.5) == 0.0 and audit.binomial_tail(1, 4, 0.0) == 0.0
    exp, top = audit.canary_exposure(torch.zeros(50), [3, 4, 5], list(range(10)), samples=500)
    assert top == pytest.approx(math.log2(1000)) and exp < 1.5  # a flat ranking exposes nothing


def test_first_round_single_step_verdicts(tmp_path: Path) -> None:
    """B = 0: dL/dA is exactly zero (pass); the full reply still leaks through dL/dB at tokens < r (fail)."""
    cfg, cells = audit.check(_cfg(tmp_path, "audit.attacks=[\"span\",\"subspace_opt\",\"grad_match\"]"),
                             ["batch_size=1", "round=first", "codec=none", "dp=none", "observed=lora_A,all"])
    rows = {r["observed"]: r for r in (audit.run_cell(cfg, c) for c in cells)}
    assert rows["lora_A"]["verdict"] == "pass", rows["lora_A"]
    assert rows["lora_A"]["token_f1"] < 0.1
    assert rows["all"]["verdict"] == "fail" and rows["all"]["token_f1"] >= 0.9


def test_audit_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Undefended batch 1 fails; strong local DP (target epsilon 1, real Opacus accountant) passes."""
    code = cli.main(["audit", str(SCENARIO), "--set", f'output.dir="{tmp_path}"',
                     "--set", "audit.grad_match_iterations=30", "--set", "audit.seeds=1",
                     "--grid", "batch_size=1", "--grid", "round=later",
                     "--grid", "codec=none,compeft:0.1", "--grid", "dp=none,local:eps=1"])
    assert code == 0
    printed = capsys.readouterr()
    out = Path(json.loads(printed.out.strip().splitlines()[-1])["audit_dir"])
    # not a terminal (no progress bar drawn): a line per attacked victim, and the report printed as written
    assert re.findall(r"^audit: (\d+)/4 victims attacked \(\d+:\d\d this session\)$", printed.err, re.M) == \
        ["1", "2", "3", "4"]
    assert "and [lo, hi] is the 95 % Student-t interval" in printed.err  # rich markup would eat "[lo, hi]"
    for name in ("audit.md", "audit.csv", "audit.json", "audit.png", "config.toml"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "audit.csv")))
    assert [(r["codec"], r["dp"]) for r in rows] == [("none", "none"), ("none", "local:eps=1"),
                                                     ("compeft:0.1", "none"), ("compeft:0.1", "local:eps=1")]
    by = {(r["codec"], r["dp"]): r for r in rows}
    assert by[("none", "none")]["verdict"] == "fail" and float(by[("none", "none")]["exact"]) > 0
    assert by[("none", "local:eps=1")]["verdict"] == "pass"
    assert by[("compeft:0.1", "local:eps=1")]["verdict"] == "pass"
    assert float(by[("none", "local:eps=1")]["epsilon"]) == pytest.approx(1.0, rel=0.02)
    assert math.isinf(float(by[("none", "none")]["epsilon"]))
    assert int(by[("compeft:0.1", "none")]["payload_bytes"]) * 10 < int(by[("none", "none")]["payload_bytes"])
    assert float(by[("compeft:0.1", "none")]["density"]) == 0.1
    assert float(by[("none", "local:eps=1")]["utility_cos"]) < 0.5 < float(by[("compeft:0.1", "none")]["utility_cos"])
    md = (out / "audit.md").read_text()
    assert md.count("**fail**") + md.count("**warn**") + md.count("**pass**") == 4 and "Legend" in md


def test_audit_cli_bad_grid_exits_2_without_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["audit", str(SCENARIO), "--set", f'output.dir="{tmp_path}"', "--grid", "size=1"])
    assert code == 2
    assert not any(tmp_path.iterdir())


def test_default_attacks_read_adam_clients_with_sign_span(tmp_path: Path) -> None:
    """The default attacks include ``sign_span``: on five AdamW steps it runs and reads most of the sentence
    (the cell's verdict counts it); on SGD it is skipped (not applicable) and span reads the update."""
    default = json.dumps(config.AuditSection().attacks)
    cfg, cells = audit.check(_cfg(tmp_path, f"audit.attacks={default}"),
                             ["batch_size=1", "round=later", "codec=none", "dp=none", "steps=5",
                              "optimizer=adamw,sgd"])
    rows = {r["optimizer"]: r for r in (audit.run_cell(cfg, c) for c in cells)}
    adam, sgd = rows["adamw"], rows["sgd"]
    assert adam["per_attack"]["sign_span"]["token_f1"] >= 0.75, adam["per_attack"]
    assert adam["token_f1"] >= adam["per_attack"]["sign_span"]["token_f1"]
    assert "sign_span" not in sgd["per_attack"] and "span" in sgd["per_attack"]


def test_a_cell_no_attack_applies_to_is_n_a_not_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With only ``sign_span`` configured, an SGD client is not attacked at all: its cell says ``n/a`` and audit.md
    names the reason; the AdamW cell beside it is attacked and gets a real verdict."""
    code = cli.main(["audit", str(SCENARIO), "--set", f'output.dir="{tmp_path}"', "--set", "audit.seeds=1",
                     "--set", 'audit.attacks=["sign_span"]', "--grid", "batch_size=1", "--grid", "round=later",
                     "--grid", "codec=none", "--grid", "dp=none", "--grid", "steps=5", "--grid", "optimizer=adamw,sgd"])
    assert code == 0
    out = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["audit_dir"])
    rows = {r["optimizer"]: r for r in csv.DictReader(open(out / "audit.csv"))}
    assert rows["sgd"]["verdict"] == "n/a" and rows["sgd"]["best_attack"] == "-"
    assert rows["adamw"]["verdict"] in ("fail", "warn", "pass") and rows["adamw"]["best_attack"] == "sign_span"
    md = (out / "audit.md").read_text()
    assert "1 n/a (no attack applies)" in md and "- `sign_span`: sign_span reads the update of an Adam(W)" in md


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_a_client_dp_cell_is_charged_with_the_run_s_client_sampling(tmp_path: Path, sampling: str) -> None:
    """The epsilon column of a client:Z cell is what the run's accountant would charge: fixed-size sampling is the
    replace-one relation at sensitivity 2C (the cell used the Poisson accountant whatever the run sampled)."""
    from fedpeft.audit.grid import client_view
    from fedpeft.privacy import ClientLevelAccountant

    cfg = _cfg(tmp_path, f'privacy.client_sampling="{sampling}"')
    cfg, cells = audit.check(cfg, ["batch_size=1", "round=later", "codec=none", "dp=client:1", "steps=1"])
    view = client_view(cfg, cells[0], 0)
    expected = {}
    for scheme in ("poisson", "fixed"):
        acc = ClientLevelAccountant(cfg.privacy.accountant, scheme)
        acc.step(1.0, 1.0)  # every client of the scenario in every round
        expected[scheme] = acc.epsilon(cfg.privacy.delta)
    assert view.epsilon == pytest.approx(expected[sampling])
    assert expected["fixed"] > 1.5 * expected["poisson"]
