"""Dependency drift: installed key dependencies against the tested ranges, the lock file, doctor and its warning."""

import logging
import os
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fedpeft import cli, versions

LOCK = Path(__file__).resolve().parent.parent / "constraints.txt"
BOUNDED = ("torch", "transformers", "peft", "opacus", "flwr")


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = str(req.specifier).removeprefix("==")
    return pins


def test_installed_key_dependencies_are_inside_the_tested_ranges():
    """Fails when the resolver installed a version nobody has tested (widening a bound is a conscious change)."""
    outside = [s for s in versions.check() if not s.ok]
    assert not outside, f"outside the tested ranges in pyproject.toml: {outside}"


def test_the_main_dependencies_have_upper_bounds():
    ranges = versions.tested_ranges()
    for name in BOUNDED:
        assert "<" in ranges[name], f"{name} has no upper bound: {ranges[name]!r}"


def test_the_lock_file_lies_inside_the_tested_ranges():
    pins, ranges = _lock(), versions.tested_ranges()
    for name in versions.KEY_PACKAGES:
        if name in pins:
            assert versions.in_range(pins[name], ranges.get(name, "")), f"{name}=={pins[name]} vs {ranges[name]}"
    assert {"transformers", "peft", "opacus", "flwr"} <= pins.keys()


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI installs exactly the lock; a developer's venv may differ")
def test_ci_runs_exactly_the_locked_versions():
    pins = _lock()
    for status in versions.check():
        if status.name in pins:
            assert status.installed == pins[status.name], status


@pytest.mark.parametrize("version, spec, ok", [
    ("5.24.0", ">=4.56,<5.25", True), ("5.25.0", ">=4.56,<5.25", False), ("2.13.0+cpu", ">=2.2,<2.14", True),
    ("2.14.0+cu128", ">=2.2,<2.14", False), ("5.25.0.dev0", "<5.25", False), (None, ">=1", False),
    ("not-a-version", ">=1", False), ("1.0", "", True),
])
def test_in_range(version, spec, ok):
    assert versions.in_range(version, spec) is ok


def test_untested_version_warns_and_doctor_fails(monkeypatch, caplog, capsys):
    monkeypatch.setattr(versions, "tested_ranges", lambda: {"transformers": "<1.0"})
    with caplog.at_level(logging.WARNING, logger="fedpeft.versions"):
        bad = versions.warn_if_untested()
    assert [s.name for s in bad] == ["transformers"]
    assert "transformers" in caplog.text and "tested <1.0" in caplog.text
    assert cli.main(["doctor", "--json"]) == 1


def test_doctor_reports_versions_and_device(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    import json

    facts = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in facts["packages"]} == set(versions.KEY_PACKAGES)
    assert facts["device"]["device"] in ("cpu", "cuda", "mps") and isinstance(facts["device"]["bf16"], bool)
    assert facts["device"]["torch_threads"] >= 1


@pytest.mark.parametrize("native", [False, True])
def test_doctor_reports_the_cpu_bf16_that_training_decides_by(monkeypatch, native: bool) -> None:
    """`fedpeft doctor`'s bf16 on a CPU is the rule ``train.precision = "auto"`` follows, not another probe."""
    import fedpeft.training

    if versions.device_facts()["device"] != "cpu":
        pytest.skip("a CUDA or MPS machine reports its accelerator's bf16")
    monkeypatch.setattr(fedpeft.training, "cpu_has_native_bf16", lambda: native)
    assert versions.device_facts()["bf16"] is native
