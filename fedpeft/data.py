"""Load examples (packaged BBC News / chatterbot, local jsonl/csv/parquet), split, tokenize, collate.

Flow: :func:`load_examples` (the registered sources, see :mod:`fedpeft.sources`) -> :func:`split_eval`
(held-out global eval set) -> :func:`partition` (client index arrays, see :mod:`fedpeft.partition`) ->
:func:`tokenize` -> :class:`Collator`.

Causal-LM examples are formatted with the prompt template (``data.prompt_template``: the tokenizer's chat
template, or :data:`PROMPT_TEMPLATE`, ``"Question: {prompt}\\nAnswer: "``, or the user's own) + the response +
the tokenizer's eos token; the loss is on the response only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedpeft.errors import DataError
from fedpeft.partition import partition, split_eval
from fedpeft.sources import PROMPT_TEMPLATE, TASKS, Examples, load_examples, prompt_formatter, uses_chat_template

__all__ = ["Examples", "load_examples", "split_eval", "partition", "tokenize", "Collator",
           "PROMPT_TEMPLATE", "IGNORE_INDEX"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss ignores (prompt tokens, padding)
# Texts are cut to max_length * CHARS_PER_TOKEN characters before the tokenizer sees them: a 10 MB field
# would otherwise be tokenized whole and then truncated. A token spans a few characters (about 4-5 in English
# prose), so the cut keeps many times what the max_length window needs; where it does not (tokens longer
# than that on average), the example is tokenized uncut.
CHARS_PER_TOKEN = 32

# ----------------------------------------------------------------------------- tokenization

class TokenizedDataset(torch.utils.data.Dataset):
    """Unpadded token ids per example; ``labels`` is an int (classification) or a token list."""

    def __init__(self, input_ids: list[list[int]], labels: list[Any], task: str) -> None:
        self.input_ids, self.labels, self.task = input_ids, labels, task

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.tensor(self.input_ids[i], dtype=torch.long)
        if self.task == "classification":
            return {"input_ids": ids, "labels": int(self.labels[i])}
        return {"input_ids": ids, "labels": torch.tensor(self.labels[i], dtype=torch.long)}

    @property
    def lengths(self) -> list[int]:
        """Token count per example (before padding)."""
        return [len(x) for x in self.input_ids]


def tokenize(ex: Examples, tokenizer: Any, max_length: int, task: str,
             prompt_template: str = "plain") -> TokenizedDataset:
    """Tokenize to at most ``max_length`` tokens per example (padding is left to :class:`Collator`); texts are
    cut to ``max_length * CHARS_PER_TOKEN`` characters first, with the same tokens as uncut. Causal-LM prompts
    are formatted by ``prompt_template`` (see :func:`fedpeft.sources.prompt_formatter`)."""
    if task != ex.task:
        raise DataError(f"cannot tokenize {ex.task} examples for task {task!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    limit = max_length * CHARS_PER_TOKEN
    if task == "classification":
        texts = list(ex.texts)
        input_ids = [list(x) for x in tokenizer([t[:limit] for t in texts], truncation=True,
                                                max_length=max_length)["input_ids"]]
        for i, t in enumerate(texts):
            if len(t) > limit and len(input_ids[i]) < max_length:  # the cut fell inside the window
                input_ids[i] = list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])
        return TokenizedDataset(input_ids, [int(v) for v in ex.labels], task)
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    silent = 0
    fmt = prompt_formatter(prompt_template, tokenizer)
    add_specials = not uses_chat_template(prompt_template, tokenizer)  # a chat template writes its own (BOS, turns)
    for p, r in zip(ex.prompts, ex.responses):
        # only the prompt's end and the response's start can reach the window (see _truncate)
        ids, n_prompt, n_lead = _encode_causal(tokenizer, fmt(p[-limit:]), r[:limit], add_specials)
        if (len(p) > limit and n_prompt < max_length) or (len(r) > limit and len(ids) <= max_length):
            ids, n_prompt, n_lead = _encode_causal(tokenizer, fmt(p), r, add_specials)
        ids, n_prompt = _truncate(ids, n_prompt, n_lead, max_length)
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        silent += n_prompt >= len(ids)
        ids_out.append(ids)
        labels_out.append(labels)
    if silent:
        logger.warning("%d of %d examples have no response tokens (empty response?) and add no loss",
                       silent, len(ex))
    return TokenizedDataset(ids_out, labels_out, task)


def _encode_causal(tokenizer: Any, prompt_text: str, response: str,
                   add_specials: bool = True) -> tuple[list[int], int, int]:
    """(ids of prompt + response [+ eos], number of prompt tokens, leading special tokens); ``add_specials``: let
    the tokenizer add its special tokens (not for a chat-formatted text, which holds them already)."""
    full = prompt_text + response
    cut = len(prompt_text)
    try:
        enc = tokenizer(full, return_offsets_mapping=True, return_special_tokens_mask=True,
                        add_special_tokens=add_specials)
        offsets, special = enc["offset_mapping"], enc["special_tokens_mask"]
    except (NotImplementedError, ValueError, TypeError):
        enc, offsets = None, None
    if enc is not None and offsets is not None:
        ids = list(enc["input_ids"])
        # the prompt ends after its last content token that ends at or before the boundary; a token
        # straddling it (BPE's " word" taking the template's trailing space) is response, and so
        # are trailing special tokens (BERT's [SEP] then acts as the end marker)
        content = [i for i, ((_, end), sp) in enumerate(zip(offsets, special)) if not sp and end <= cut]
        n_lead = next((i for i, sp in enumerate(special) if not sp), len(ids))
        n_prompt = content[-1] + 1 if content else n_lead
    else:  # slow tokenizer without offsets: the prompt alone, minus its trailing special tokens
        ids = list(tokenizer(full, add_special_tokens=add_specials)["input_ids"])
        p_ids = list(tokenizer(prompt_text, add_special_tokens=add_specials)["input_ids"])
        specials = set(getattr(tokenizer, "all_special_ids", []))
        while p_ids and p_ids[-1] in specials:
            p_ids.pop()
        n_prompt = len(p_ids)
        n_lead = next((i for i, t in enumerate(p_ids) if t not in specials), len(p_ids))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids, n_prompt, min(n_lead, n_prompt)


def _truncate(ids: list[int], n_prompt: int, n_lead: int, max_length: int) -> tuple[list[int], int]:
    """Cut to ``max_length``, keeping the first response token: drop the response's tail first,
    then the start of the prompt text (the leading special tokens and the "Answer:" cue stay)."""
    if len(ids) <= max_length:
        return ids, n_prompt
    if n_prompt < max_length or n_prompt >= len(ids):
        return ids[:max_length], min(n_prompt, max_length)
    keep = max(0, max_length - 1 - n_lead)
    lead = ids[: min(n_lead, max_length - 1)]
    kept_prompt = lead + (ids[n_prompt - keep: n_prompt] if keep else [])
    return kept_prompt + ids[n_prompt: n_prompt + 1], len(kept_prompt)


class Collator:
    """Right-pads a batch to its longest example: ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, pad_token_id: int, task: str) -> None:
        if pad_token_id is None:
            raise DataError("the tokenizer has no pad token; pass e.g. its eos_token_id as pad_token_id")
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
        self.pad_token_id, self.task = int(pad_token_id), task

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[i, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        if self.task == "classification":
            labels = torch.tensor([int(item["labels"]) for item in batch], dtype=torch.long)
        else:
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for i, item in enumerate(batch):
                lab = torch.as_tensor(item["labels"], dtype=torch.long)
                labels[i, : len(lab)] = lab
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
