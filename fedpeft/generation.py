"""Generation-based evaluation of a causal LM: greedy answers to held-out prompts scored by exact match and
ROUGE-L, and multiple-choice questions scored by log-likelihood in FlowerTune's prompt format.

Both run on the server's held-out data after the last round (``[generation]``, docs/generative.md) and write
what they saw, one JSON object per prompt, to ``RUN/generations.jsonl``. Flower-free.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from fedpeft.errors import DataError
from fedpeft.sources import Examples, prompt_formatter, read_rows, uses_chat_template
from fedpeft.text_metrics import rouge_l

if TYPE_CHECKING:
    from fedpeft.config import Config, GenerationSection
    from fedpeft.runtime import Runtime

log = logging.getLogger(__name__)
SAMPLES_FILE = "generations.jsonl"
LETTERS = "ABCDE"
# FlowerTune LLM leaderboard, general NLP (MMLU): its instruction, question/options layout and chat wrapping
MC_INSTRUCTION = "Answer the following multiple choice question."
MC_WRAP = "<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (SQuAD-style, articles kept)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(output: str, reference: str) -> float:
    """1.0 when the normalized output equals the normalized reference."""
    return float(normalize(output) == normalize(reference))


def rouge_l_words(output: str, reference: str) -> float:
    """ROUGE-L F-measure over the normalized words."""
    return rouge_l(normalize(output).split(), normalize(reference).split())


def _left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_new_tokens: int, batch_size: int,
             device: torch.device, max_prompt_tokens: int = 0, specials: bool = True) -> list[str]:
    """Greedy continuations of ``texts`` (already formatted prompts), decoded without special tokens.

    Batches are left-padded; a prompt longer than ``max_prompt_tokens`` keeps its end (where the answer cue is).
    """
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(texts), batch_size):
        rows = [list(tokenizer(t, add_special_tokens=specials)["input_ids"]) for t in texts[start:start + batch_size]]
        rows = [r[-max_prompt_tokens:] if max_prompt_tokens else r for r in rows]
        ids, mask = _left_padded(rows, int(pad), device)
        out = cast(Any, model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=int(pad), eos_token_id=tokenizer.eos_token_id)
        outputs += [tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]
    return outputs


def evaluate_generation(model: nn.Module, tokenizer: Any, examples: Examples, prompt_template: str,
                        gen: GenerationSection, device: torch.device,
                        max_prompt_tokens: int = 0) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Answer the first ``gen.eval_examples`` prompts of ``examples``; (mean metrics, one row per prompt)."""
    n = min(gen.eval_examples, len(examples))
    fmt = prompt_formatter(prompt_template, tokenizer)
    prompts, refs = examples.prompts[:n], examples.responses[:n]
    outs = generate(model, tokenizer, [fmt(p) for p in prompts], gen.max_new_tokens, gen.batch_size, device,
                    max_prompt_tokens, specials=not uses_chat_template(prompt_template, tokenizer))
    em = [exact_match(o, r) for o, r in zip(outs, refs)]
    rl = [round(rouge_l_words(o, r), 6) for o, r in zip(outs, refs)]
    rows = [{"kind": "generation", "prompt": p, "reference": r, "output": o, "exact_match": e, "rougeL": f}
            for p, r, o, e, f in zip(prompts, refs, outs, em, rl)]
    metrics = {"gen_examples": float(n), "gen_exact_match": sum(em) / max(1, n), "gen_rougeL": sum(rl) / max(1, n)}
    return metrics, rows


# ----------------------------------------------------------------------------- multiple choice

@dataclass(frozen=True)
class Question:
    """One multiple-choice question: its options and the index of the right one."""

    question: str
    options: list[str]
    answer: int


def _options(path: Path, where: str, row: dict[str, Any]) -> list[str]:
    raw = row.get("choices", row.get("options"))
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if raw is None:
        raw = [row[c] for c in LETTERS if row.get(c) not in (None, "")]
    if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS):
        raise DataError(f"{path}, {where}: expected 2-{len(LETTERS)} options (a 'choices' list or columns "
                        f"{', '.join(LETTERS)})")
    return [str(o) for o in raw]


def _answer(path: Path, where: str, value: Any, options: list[str]) -> int:
    text = str(value).strip()
    if len(text) == 1 and text.upper() in LETTERS[:len(options)]:
        return LETTERS.index(text.upper())
    if text.isdigit() and int(text) < len(options):
        return int(text)
    if text in options:
        return options.index(text)
    raise DataError(f"{path}, {where}: answer {value!r} is not one of the letters {LETTERS[:len(options)]}, an "
                    f"index 0-{len(options) - 1} or an option's text")


def load_questions(path: str | Path, limit: int = 0) -> list[Question]:
    """Multiple-choice questions from a local .jsonl/.csv/.parquet file: ``question`` (or MMLU's ``input``),
    options as a ``choices`` list or columns ``A``..``E``, ``answer`` (or ``target``) as a letter, a 0-based
    index or the option's text."""
    p = Path(path).expanduser()
    _, rows = read_rows(p)
    out = []
    for where, row in rows[:limit or None]:
        q = row.get("question", row.get("input"))
        if q is None or "answer" not in row and "target" not in row:
            raise DataError(f"{p}, {where}: needs a 'question' (or 'input') and an 'answer' (or 'target') column")
        options = _options(p, where, row)
        out.append(Question(str(q), options, _answer(p, where, row.get("answer", row.get("target")), options)))
    if not out:
        raise DataError(f"{p}: no questions")
    return out


def flowertune_prompt(q: Question) -> str:
    """The text FlowerTune's MMLU evaluation feeds its model; the answer letter comes next."""
    text = q.question if q.question.endswith(("?", ".")) else q.question + "?"
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(q.options))
    prompt = f"{MC_INSTRUCTION}\nQuestion: {text}\n\nOptions:\n{options}\nThe answer is:\n"
    return MC_WRAP.format(prompt=prompt)


def _first_letter(text: str) -> str:
    """FlowerTune's reading of a generated answer: alphanumerics only, lower case, the first character."""
    cleaned = " ".join(re.sub(r"[^a-zA-Z0-9]", " ", text).split()).lower()
    return cleaned[:1]


@torch.no_grad()
def score_choices(model: nn.Module, tokenizer: Any, questions: Sequence[Question],
                  device: torch.device) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each option letter's log-likelihood after :func:`flowertune_prompt`; the most likely letter is the answer.

    ``mc_accuracy``: that answer is right. ``mc_accuracy_greedy``: the single most likely next token over the whole
    vocabulary, read the way FlowerTune reads its one-token greedy answer, is the right letter (its number; an
    answer that is no letter counts as wrong there).
    """
    model.eval()
    rows: list[dict[str, Any]] = []
    right = greedy_right = 0
    for q in questions:
        prefix = list(tokenizer(flowertune_prompt(q))["input_ids"])
        letters = [list(tokenizer(LETTERS[i], add_special_tokens=False)["input_ids"]) for i in range(len(q.options))]
        first = torch.log_softmax(model(input_ids=torch.tensor([prefix], device=device)).logits[0, -1].float(), -1)
        scores = []
        for toks in letters:
            if len(toks) == 1:
                scores.append(float(first[toks[0]]))
                continue
            ids = torch.tensor([prefix + toks], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prefix) - 1:-1].float(), -1)
            scores.append(float(logp.gather(1, torch.tensor(toks, device=device)[:, None]).sum()))
        pick = max(range(len(scores)), key=scores.__getitem__)
        greedy = _first_letter(tokenizer.decode([int(first.argmax())], skip_special_tokens=True))
        right += pick == q.answer
        greedy_right += greedy == LETTERS[q.answer].lower()
        rows.append({"kind": "choice", "question": q.question, "answer": LETTERS[q.answer],
                     "predicted": LETTERS[pick], "greedy": greedy, "scores": [round(s, 4) for s in scores]})
    n = max(1, len(rows))
    return ({"mc_questions": float(len(rows)),
             "mc_accuracy": right / n, "mc_accuracy_greedy": greedy_right / n}, rows)


# ----------------------------------------------------------------------------- the server's hook

def write_samples(run_dir: Path, rnd: int, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (tagged with the round) to ``RUN/generations.jsonl``."""
    with (run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({"round": rnd, **row}, ensure_ascii=False) + "\n")


def evaluate_round(rt: Runtime, cfg: Config, run_dir: Path, rnd: int) -> dict[str, float]:
    """The server's generation metrics for round ``rnd`` (its model holds the global adapter already): after the
    last round, or at every evaluation with ``generation.every_eval``; {} when ``[generation]`` is off."""
    gen = cfg.generation
    if not (gen.eval_examples or gen.choices_path) or (rnd != cfg.federation.rounds and not gen.every_eval):
        return {}
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    if gen.eval_examples:
        m, r = evaluate_generation(rt.model, rt.tokenizer, rt.eval_examples, cfg.data.prompt_template, gen,
                                   rt.device, cfg.model.max_length)
        metrics.update(m)
        rows += r
    if gen.choices_path:
        m, r = score_choices(rt.model, rt.tokenizer, load_questions(gen.choices_path, gen.choices_max), rt.device)
        metrics.update(m)
        rows += r
    write_samples(run_dir, rnd, rows)
    log.info("round %d generation: %s", rnd, metrics)
    return metrics
