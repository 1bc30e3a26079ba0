"""Generative LMs: prompt templates (plain, custom, the tokenizer's chat template), generation-based evaluation
(exact match, ROUGE-L, RUN/generations.jsonl) and multiple-choice log-likelihood scoring in FlowerTune's format,
on tiny causal LMs built from a config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import config, data, generation, models, report, training
from fedpeft.config import GenerationSection, ModelSection
from fedpeft.errors import ConfigError, DataError
from fedpeft.simulation import runner
from fedpeft.sources import PROMPT_TEMPLATE, Examples, prompt_formatter

from conftest import QA, tiny_overrides

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _qa(pairs=QA) -> Examples:
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    return Examples("causal_lm", [p + r for p, r in pairs], np.full(len(pairs), -1), [], prompts, responses)


@pytest.fixture
def chat_tok():
    tok = models.byte_tokenizer()
    tok.chat_template = CHAT
    return tok


def test_prompt_templates_plain_custom_and_chat(chat_tok):
    plain = models.byte_tokenizer()
    assert prompt_formatter("auto", plain)("hi") == PROMPT_TEMPLATE.format(prompt="hi")  # no chat template
    assert prompt_formatter("plain", chat_tok)("hi") == "Question: hi\nAnswer: "
    assert prompt_formatter("### {prompt} ->", plain)("a {b}") == "### a {b} ->"  # braces in the prompt are text
    assert prompt_formatter("auto", chat_tok)("hi") == "<|user|>hi\n<|assistant|>"
    assert prompt_formatter("chat", chat_tok)("hi") == "<|user|>hi\n<|assistant|>"
    with pytest.raises(DataError, match="no chat template"):
        prompt_formatter("chat", plain)
    with pytest.raises(DataError, match=r"holds \{prompt\} exactly once"):
        prompt_formatter("Q: {prompt} {prompt}", plain)


def test_chat_template_tokenization_puts_the_loss_on_the_response_only(chat_tok):
    ds = data.tokenize(_qa([("name a color", "blue")]), chat_tok, 64, "causal_lm", prompt_template="auto")
    item = ds[0]
    prompt_len = len(chat_tok("<|user|>name a color\n<|assistant|>", add_special_tokens=False)["input_ids"])
    labels = item["labels"].tolist()
    assert labels[:prompt_len] == [data.IGNORE_INDEX] * prompt_len
    assert chat_tok.decode(item["input_ids"][prompt_len:]) == "blue" + chat_tok.eos_token
    assert labels[prompt_len:] == item["input_ids"][prompt_len:].tolist()


def test_bad_prompt_template_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.prompt_template = 'Q:'"):
        config.load(None, ['data.prompt_template="Q:"'])
    out = subprocess.run([sys.executable, "-m", "fedpeft.cli", "config", "--set", 'data.prompt_template="Q:"'],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.prompt_template" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sets, match", [
    ({"generation.eval_examples": 4}, "model.task = 'causal_lm'"),
    ({"generation.eval_examples": 4, "model.task": "causal_lm", "data.source": "chatterbot",
      "federation.evaluation": "federated", "data.client_eval_fraction": 0.2}, "federation.evaluation"),
    ({"generation.choices_path": "/nonexistent/mc.jsonl", "model.task": "causal_lm",
      "data.source": "chatterbot"}, "file not found"),
])
def test_generation_settings_refused_where_they_cannot_run(sets, match):
    with pytest.raises(ConfigError, match=match):
        config.load(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_exact_match_and_rouge_l_on_words():
    assert generation.exact_match("Paris.", " paris") == 1.0 and generation.exact_match("Paris, France", "paris") == 0
    assert generation.rouge_l_words("the cat sat", "the cat sat") == 1.0
    # LCS("a b c d", "a c d e") = 3: precision 3/4, recall 3/4
    assert generation.rouge_l_words("a b c d", "A, c d e") == pytest.approx(0.75)
    assert generation.rouge_l_words("", "x") == 0.0


def _tiny_lm(seed: int = 0):
    cfg = ModelSection(name="tiny-llama", task="causal_lm", tiny_hidden_size=64)
    base = models.load_base_model(cfg, seed=seed)
    return models.build_peft_model(base, config.AdapterSection(r=8), "causal_lm", seed=seed)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    model, tok = _tiny_lm(), models.byte_tokenizer()
    texts = [PROMPT_TEMPLATE.format(prompt=p) for p, _ in QA]
    with torch.random.fork_rng():
        torch.manual_seed(1)  # a non-zero LoRA B so the adapter is part of what is generated
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    alone = [generation.generate(model, tok, [t], 6, 1, torch.device("cpu"))[0] for t in texts]
    batched = generation.generate(model, tok, texts, 6, 4, torch.device("cpu"))
    assert batched == alone and len(set(alone)) > 1


def test_fine_tuning_lifts_exact_match_and_rouge_l_over_the_base_model():
    """A tiny LM memorises six Q/A pairs: generation metrics go from nothing to (nearly) all right."""
    model, tok = _tiny_lm(), models.byte_tokenizer()
    ex = _qa()
    gen = GenerationSection(eval_examples=6, max_new_tokens=12)
    cpu = torch.device("cpu")
    before, _ = generation.evaluate_generation(model, tok, ex, "plain", gen, cpu)
    ds = data.tokenize(_qa(QA * 4), tok, 64, "causal_lm")
    tcfg = config.TrainSection(local_steps=150, batch_size=8, lr=0.01)
    training.train_local(model, ds, data.Collator(tok.pad_token_id, "causal_lm"), tcfg, cpu, seed=0)
    after, rows = generation.evaluate_generation(model, tok, ex, "plain", gen, cpu)
    assert before["gen_exact_match"] == 0.0 and before["gen_rougeL"] < 0.2
    assert after["gen_exact_match"] >= 5 / 6 and after["gen_rougeL"] >= 0.9
    assert [r["reference"] for r in rows] == [r for _, r in QA] and all("output" in r for r in rows)


# ----------------------------------------------------------------------------- multiple choice

def _write_mc(path: Path) -> Path:
    rows = [{"question": "What do cows say", "A": "moo", "B": "woof", "C": "meow", "D": "quack", "answer": "A"},
            {"input": "Opposite of hot.", "choices": ["warm", "cold"], "target": 1},
            {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": "Paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_multiple_choice_files_in_the_layouts_of_the_real_sets(tmp_path):
    qs = generation.load_questions(_write_mc(tmp_path / "mc.jsonl"))
    assert [(q.options, q.answer) for q in qs] == [(["moo", "woof", "meow", "quack"], 0), (["warm", "cold"], 1),
                                                   (["Rome", "Paris", "Oslo"], 1)]
    csv = tmp_path / "mmlu.csv"  # MMLU's own columns
    csv.write_text("input,A,B,C,D,target\n\"2+2?\",3,4,5,6,B\n")
    assert generation.load_questions(csv)[0].answer == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["x", "y"], "answer": "E"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: answer 'E'"):
        generation.load_questions(bad)


def test_flowertune_prompt_format():
    q = generation.Question("What do cows say", ["moo", "woof"], 0)
    assert generation.flowertune_prompt(q) == (
        "<|im_start|>question\nAnswer the following multiple choice question.\nQuestion: What do cows say?\n\n"
        "Options:\nA. moo\nB. woof\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n")


def test_choice_scores_are_the_letters_log_likelihoods(tmp_path):
    """Checked against a separate forward of the prompt followed by each letter."""
    model, tok = _tiny_lm(seed=3), models.byte_tokenizer()
    qs = generation.load_questions(_write_mc(tmp_path / "mc.jsonl"))
    metrics, rows = generation.score_choices(model, tok, qs, torch.device("cpu"))
    for q, row in zip(qs, rows):
        for i, score in enumerate(row["scores"]):
            ids = tok(generation.flowertune_prompt(q) + "ABCDE"[i])["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -2], -1)[ids[-1]]
            assert score == pytest.approx(float(logp), abs=1e-3)
        assert row["predicted"] == "ABCDE"[int(np.argmax(row["scores"]))]
    assert metrics["mc_accuracy"] == np.mean([r["predicted"] == r["answer"] for r in rows])
    assert metrics["mc_questions"] == 3


def test_a_run_writes_generation_metrics_and_samples_after_the_last_round(qa_data, tmp_path):
    mc = _write_mc(tmp_path / "mc.jsonl")
    cfg = config.load(None, tiny_overrides(qa_data, tmp_path / "runs", **{
        "model.name": "tiny-gpt2", "model.task": "causal_lm", "federation.rounds": 2, "train.local_steps": 2,
        "generation.eval_examples": 5, "generation.max_new_tokens": 4, "generation.choices_path": str(mc)}))
    run_dir = runner.simulate(cfg)
    rows = report.read_metrics(run_dir)
    assert "gen_rougeL" not in rows[0]  # only after the last round unless generation.every_eval
    assert rows[-1]["gen_examples"] == 5 and 0 <= rows[-1]["gen_rougeL"] <= 1 and rows[-1]["mc_questions"] == 3
    samples = [json.loads(line) for line in (run_dir / generation.SAMPLES_FILE).read_text().splitlines()]
    assert [s["kind"] for s in samples] == ["generation"] * 5 + ["choice"] * 3
    assert {s["round"] for s in samples} == {2}
    assert np.mean([s["rougeL"] for s in samples[:5]]) == pytest.approx(rows[-1]["gen_rougeL"])
    assert "gen_rougeL" in (run_dir / "summary.md").read_text()
