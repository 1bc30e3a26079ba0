"""Run directories: one pattern, never shared by two runs."""

import re
from pathlib import Path

from fedpeft.rundir import new_run_dir


def test_two_calls_in_the_same_second_get_distinct_directories(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("time.strftime", lambda fmt: "20260101-120000")  # both calls in the same second
    first, second, third = (new_run_dir(tmp_path / "runs", "quick") for _ in range(3))
    assert [p.name for p in (first, second, third)] == ["quick-20260101-120000", "quick-20260101-120000-2",
                                                         "quick-20260101-120000-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))


def test_name_pattern(tmp_path: Path) -> None:
    path = new_run_dir(tmp_path, "x-audit")
    assert path.parent == tmp_path and re.fullmatch(r"x-audit-\d{8}-\d{6}", path.name)
