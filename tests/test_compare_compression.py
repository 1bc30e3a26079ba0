"""compare-compression: one seeded run per codec, a table, a CSV and a plot."""

import csv
import json
import re
import subprocess
import sys

from fedpeft.simulation.sweep import split_codecs


def test_codec_list_keeps_options_with_their_codec():
    assert split_codecs("none, compeft:0.05,scale=std,alpha=2 ,int8") == ["none", "compeft:0.05,scale=std,alpha=2",
                                                                          "int8"]


def test_compare_compression_end_to_end(cls_data, tmp_path):
    from conftest import tiny_overrides
    sets = [x for s in tiny_overrides(cls_data, tmp_path / "out", **{"federation.rounds": 2, "output.plots": True,
                                                                     "adapter.r": 16})
            for x in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "fedpeft.cli", "compare-compression", *sets,
                          "--codecs", "none,fp16,compeft:0.1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    # stderr is a pipe, not a terminal: no progress bar, a line per round of each codec instead
    assert re.findall(r"^compare-compression: (\S+) round (\d)/2 \(\d+:\d\d this session\)$", res.stderr, re.M) == \
        [(codec, r) for codec in ("none", "fp16", "compeft:0.1") for r in "12"]
    sweep = json.loads(res.stdout.strip().splitlines()[-1])["sweep_dir"]
    rows = {r["codec"]: r for r in csv.DictReader(open(f"{sweep}/compression.csv"))}
    assert list(rows) == ["none", "fp16", "compeft:0.1"]
    up = {k: float(r["uplink_bytes_per_round"]) for k, r in rows.items()}
    assert up["compeft:0.1"] < up["fp16"] < up["none"]
    assert float(rows["none"]["accuracy_delta_vs_none"]) == 0.0
    assert float(rows["compeft:0.1"]["entropy_bound_ratio"]) > float(rows["compeft:0.1"]["ratio_vs_fp32"]) > 1
    for name in ("compression.md", "compression.png"):
        assert (tmp_path / "out").joinpath(sweep.split("/")[-1], name).exists()


def test_bad_codec_fails_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fedpeft.cli", "compare-compression", "--codecs", "none,zip:9",
                          "--set", f"output.dir=\"{tmp_path}\""], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "zip" in res.stderr and "compeft" in res.stderr
    assert not any(tmp_path.iterdir())
