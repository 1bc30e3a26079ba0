"""Run directories: one pattern, never shared by two runs."""

import re
from pathlib import Path

import pytest

from fedpeft import cli
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


def _simulate_fails(out: Path, capsys: pytest.CaptureFixture) -> str:
    assert cli.main(["simulate", "--set", f"output.dir={str(out)!r}", "--set", "run.name=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_output_dir_that_is_a_file_exits_2_in_one_line(tmp_path: Path, capsys, below) -> None:
    (tmp_path / "afile").write_text("x")
    err = _simulate_fails(tmp_path / "afile" / below, capsys)
    assert "output.dir" in err and "afile is a file" in err


def test_an_output_dir_that_is_not_writable_exits_2_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    def refuse(self, *args, **kwargs):  # what mkdir does in a read-only directory (unless run as root)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    err = _simulate_fails(tmp_path / "ro", capsys)
    assert "output.dir" in err and "(Permission denied)" in err
