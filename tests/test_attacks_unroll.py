"""``unroll``: the replay of a client's local training as a verifier of whole texts, and the search it drives.

Victims are built with plain transformers + peft (``tests/plain_victims.py``), not fedpeft's training code.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from plain_victims import SENTENCES, adamw_victim, dropout_victim, wordpiece

from fedpeft.attacks import NotApplicable, Observation, run_attack, unroll
from fedpeft.attacks.unroll import Replay

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(seed: int, length: int) -> torch.Tensor:
    return torch.tensor([wordpiece()(SENTENCES[seed])["input_ids"][:length]])


@pytest.mark.parametrize("later", [False, True])
def test_the_replay_reproduces_an_independent_clients_adamw_update(later: bool) -> None:
    """Five torch AdamW steps (weight decay 0.01) on a tiny LLaMA: the true sentence replays to the received
    update; one wrong token, two swapped tokens or the wrong weight decay do not."""
    ids = _ids(0, 16)
    obs = adamw_victim("llama", 0, ids, later=later)
    truth = ids[0].tolist()
    wrong, swapped = list(truth), list(truth)
    wrong[7] = 2000
    swapped[3], swapped[9] = swapped[9], swapped[3]
    same, off, moved = Replay(obs).cosines([truth, wrong, swapped])
    assert same > 0.9999 and off < 0.9 and moved < 0.9, (same, off, moved)
    (no_decay,) = Replay(dataclasses.replace(obs, weight_decay=0.0)).cosines([truth])
    assert no_decay < same


def test_the_search_puts_a_shuffled_sentence_back_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the sentence's tokens in a random order as the only pool, the search finds the order: the replay's
    cosine is a verifier, not a token score."""
    ids = _ids(1, 8)
    obs = adamw_victim("llama", 1, ids)
    truth = ids[0].tolist()
    shuffled = random.Random(0).sample(truth, len(truth))
    assert shuffled != truth and len(set(truth)) == len(truth)
    monkeypatch.setattr(unroll, "_start", lambda obs, pool: (shuffled, shuffled, torch.zeros(30522), []))
    result = run_attack("unroll", obs, replays=3000, batch=32)
    assert result.sequences == [truth], (result.sequences, result.extra)
    assert result.extra["cosine"] > 0.9999 and result.extra["replays"] < 3000


def test_unroll_refuses_what_it_cannot_replay() -> None:
    obs = adamw_victim("llama", 0, _ids(0, 8))
    for change, word in [({"batch_size": 2}, "batch size"), ({"dropout": 0.1}, "dropout"),
                         ({"task": "classification"}, "causal"), ({"kind": "gradient"}, "one SGD step"),
                         ({"optimizer": "adam", "weight_decay": 0.01}, "weight decay")]:
        with pytest.raises(NotApplicable, match=word):
            run_attack("unroll", dataclasses.replace(obs, **change))


def test_the_replay_reproduces_fedpeft_s_own_client_with_its_gradient_clip(tmp_path) -> None:
    """The audit's victim: fedpeft's train_local, five AdamW steps with a total-norm clip of 0.1 (public in
    the Observation), in fp32: the true text replays to cosine 1; without the clip the replay no longer matches.
    (Under CPU bf16 autocast, ``train.precision = "auto"`` on a host with native bf16, it replays to 0.999.)"""
    from pathlib import Path

    from fedpeft import config
    from fedpeft.audit import run as audit
    from fedpeft.audit.grid import client_view

    scenario = Path(__file__).resolve().parents[1] / "simulations" / "privacy-audit.toml"
    cfg = config.load(scenario, [f'output.dir="{tmp_path}"', "audit.seeds=1", "train.max_grad_norm=0.1",
                                 'train.optimizer="adamw"', "train.lr=0.01", 'train.precision="fp32"'])
    cfg, cells = audit.check(cfg, ["batch_size=1", "round=later", "codec=none", "dp=none", "steps=5",
                                   "optimizer=adamw"])
    view = client_view(cfg, cells[0], 0)
    obs, truth = view.obs, view.truth.input_ids[0].tolist()
    assert obs.max_grad_norm == 0.1 and obs.optimizer == "adamw" and obs.local_steps == 5
    (same,) = Replay(obs).cosines([truth])
    (unclipped,) = Replay(dataclasses.replace(obs, max_grad_norm=0.0)).cosines([truth])
    assert same > 0.9999 and unclipped < 0.999, (same, unclipped)  # Adam undoes most of a clip: 0.995 without it


def _random_text_victim(seed: int) -> tuple[Observation, list[int]]:
    """Five AdamW steps of the plain tiny LLaMA over a 400-token vocabulary on 12 random ids (a vocabulary small
    enough for the fill's whole-vocabulary scans to take seconds)."""
    ids = torch.randint(3, 400, (1, 12), generator=torch.Generator().manual_seed(seed))
    return adamw_victim("llama", seed, ids, vocab=400), ids[0].tolist()


def test_fill_finds_a_token_the_pool_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search cannot place a token outside its pool; the fill stage scans the whole vocabulary at the earliest
    unconfirmed position (one pass each, then full replays of the shortlist) and finds the last token."""
    obs, truth = _random_text_victim(3)
    start = truth[:-1] + [5 if truth[-1] != 5 else 6]
    monkeypatch.setattr(unroll, "_start", lambda obs, pool: (start, start, torch.zeros(400), []))
    without = run_attack("unroll", obs, replays=200, fill=0)
    assert without.sequences[0] != truth and truth[-1] not in without.sequences[0][-1:]
    result = run_attack("unroll", obs, replays=200, fill=1)
    assert result.sequences == [truth] and result.extra["cosine"] > 0.9999, result.extra


def test_fill_inserts_a_missing_token_and_the_tail_shifts_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A text that lacks one token the pool lacks too has the rest of the sentence one place early (what the
    search leaves when it dropped it): put in place, the token leaves the tail misplaced; inserted, the tail
    shifts back. The scan tries both and the sentence comes back whole."""
    obs, truth = _random_text_victim(3)
    k = next(i for i in range(3, 8) if truth.count(truth[i]) == 1)
    filler = next(v for v in range(5, 400) if v not in truth)
    start = truth[:k] + truth[k + 1:] + [filler]
    monkeypatch.setattr(unroll, "_start", lambda obs, pool: (start, start, torch.zeros(400), []))
    result = run_attack("unroll", obs, replays=100, fill=2)
    assert result.sequences == [truth] and result.extra["cosine"] > 0.9999, (result.sequences, truth, result.extra)


def test_a_wrong_token_is_put_right_in_place_even_where_an_insertion_also_raises_the_cosine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One wrong token inside the text: the token inserted at the gap (the tail shifted) can raise the cosine too, but
    less than the token put in place; each refill step scans both places and keeps the better, so one step puts
    the sentence back (scanned first and kept, the insertion used to take the step and shift a right tail)."""
    obs, truth = _random_text_victim(5)
    filler = next(v for v in range(5, 400) if v not in truth)
    start = truth[:6] + [filler] + truth[7:]
    monkeypatch.setattr(unroll, "_start", lambda obs, pool: (start, start, torch.zeros(400), []))
    result = run_attack("unroll", obs, replays=1, fill=1)
    assert result.sequences == [truth] and result.extra["cosine"] > 0.9999, (result.sequences, truth, result.extra)


def test_an_adam_clients_scan_scores_by_the_gradients_signs() -> None:
    """Adam's first step moves every coordinate along the gradient's sign: scored by the signs, the true token ranks
    at the top of a scan (every other position from there on wrong); scored by the raw gradient's cosine (what an
    SGD client's scan uses) it falls well down the list at some positions."""
    for seed in (3, 7):
        obs, truth = _random_text_victim(seed)
        by_signs, by_gradient = Replay(obs), Replay(dataclasses.replace(obs, optimizer="sgd"))
        ranks: dict[str, list[int]] = {"signs": [], "gradient": []}
        for k in range(1, len(truth)):
            text = list(truth)
            for j in range(k, len(truth), 2):
                text[j] = 5 if truth[j] != 5 else 6
            texts = [unroll._put(text, k, v) for v in range(400)]
            for name, replay in (("signs", by_signs), ("gradient", by_gradient)):
                score = replay.first_step_alignment(texts, prefix=k)
                ranks[name].append(int((score > score[truth[k]]).sum()))
        assert max(ranks["signs"]) <= 1 and max(ranks["gradient"]) >= 5, (seed, ranks)


@pytest.mark.parametrize("later", [False, True])
def test_a_scan_with_a_shared_prefix_scores_as_the_whole_pass_does(later: bool) -> None:
    """Texts that share their first p tokens skip those positions' output layer (one fixed gradient on the hidden
    states instead): the first-step alignments are the whole pass's, in place and inserted, early and late."""
    obs, truth = _random_text_victim(4)
    obs = adamw_victim("llama", 4, torch.tensor([truth]), later=later, vocab=400)
    replay = Replay(obs)
    for p in (2, 6, 11):
        for inserted in (False, True):
            texts = [unroll._put(truth, p, v, inserted) for v in range(0, 400, 3)]
            whole, shared = replay.first_step_alignment(texts), replay.first_step_alignment(texts, prefix=p)
            assert torch.allclose(whole, shared, atol=1e-6) and whole.abs().max() > 0.05, (p, inserted)
    texts = [truth, truth[:1] + [7] + truth[2:]]  # not one prefix: the second text is scored with the first's
    assert not torch.allclose(replay.first_step_alignment(texts, prefix=4), replay.first_step_alignment(texts))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_replay_on_a_cuda_gpu_matches_the_cpu() -> None:
    """The replay runs on a CUDA GPU where there is one: the true text still replays to cosine 1, and a text one
    token off gets the cosine the CPU gives it."""
    ids = _ids(0, 16)
    obs, truth = adamw_victim("llama", 0, ids), ids[0].tolist()
    wrong = truth[:5] + [(truth[5] + 1) % 30522] + truth[6:]
    gpu = Replay(obs, torch.device("cuda")).cosines([truth, wrong])
    cpu = Replay(obs, torch.device("cpu")).cosines([truth, wrong])
    assert gpu[0] > 0.9999 and abs(gpu[1] - cpu[1]) < 1e-3, (gpu, cpu)


def test_a_vain_scan_is_not_repeated_and_the_fill_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refill that finds nothing better does not end the fill, and the same scan (place, in place or inserted) is
    not run again on the same text (it would find the same): the fill goes on to the other places."""
    obs, truth = _random_text_victim(3)
    start = truth[:-2] + [v if v not in truth[-2:] else v + 2 for v in (5, 6)]  # two positions wrong
    monkeypatch.setattr(unroll, "_start", lambda obs, pool: (start, start, torch.zeros(400), []))
    real, scans = unroll._fill_position, []

    def first_in_vain(replay: Replay, text: list[int], cosine: float, position: int, shortlist: int,
                      inserted: bool = False) -> tuple[list[int], float, int]:
        scans.append((tuple(text), position, inserted))
        found = real(replay, text, cosine, position, shortlist, inserted)
        return (text, cosine, found[2]) if len(scans) == 1 else found

    monkeypatch.setattr(unroll, "_fill_position", first_in_vain)
    run_attack("unroll", obs, replays=50, fill=2)
    assert len(scans) >= 2 and len(set(scans)) == len(scans), scans


def test_the_bag_keeps_the_start_s_picks_unless_the_replay_refutes_them() -> None:
    """Confirmed: the pad in a token's place lowers the cosine by at least half the median fall; a pick of the
    ranking attack also stays with any positive fall, and goes when the pad does as well as it (fall <= 0)."""
    text, falls = [11, 12, 13, 14], [0.30, 0.01, -0.02, 0.25]  # level: half the median fall, 0.125
    assert unroll._confirmed(text, falls, picks=[]) == [11, 14]
    assert unroll._confirmed(text, falls, picks=[12, 13]) == [11, 12, 14]


def test_a_one_step_sgd_gradient_replays_too() -> None:
    """The audit's single-step SGD client (kind "gradient": the delta rescaled by -1/lr): the true text replays to
    cosine 1, one wrong token does not."""
    from fedpeft.audit.victim import make_victim

    obs, truth = make_victim(batch_size=1, seed=0, r=8)
    assert obs.kind == "gradient" and obs.local_steps == 1
    text = truth.input_ids[0].tolist()
    wrong = text[:3] + [(text[3] + 1) % truth.vocab_size] + text[4:]
    same, off = Replay(obs).cosines([text, wrong])
    assert same > 0.9999 and off < 0.99, (same, off)


def test_unroll_reads_a_dropout_clients_sentence_over_the_rank_budget() -> None:
    """GPT-2 with dropout 0.1 at r = 8 (8 rows for 11 visible tokens: over the span test's budget), one SGD step:
    the search, the per-position sweep and the label channel, comparing updates away from the dropout noise
    directions, read the sentence; the same search comparing whole updates does not."""
    obs, ids = dropout_victim("gpt2", 0, r=8)
    kwargs = {"replays": 300, "fill": 0, "noise_samples": 128}
    assert run_attack("span_decode", obs).sequences != ids.tolist()
    assert run_attack("unroll", obs, **kwargs).sequences == ids.tolist()
    assert run_attack("unroll", obs, **{**kwargs, "noise_samples": 0}).sequences != ids.tolist()


def test_a_stray_token_is_deleted_and_the_label_channel_ends_the_text() -> None:
    """A text with a token the client's lacks (the rest one place late, its last token pushed off): the deletion
    scan removes the stray and takes the freed last place from the label channel; with the pad there instead it
    does not read the sentence."""
    obs, ids = dropout_victim("gpt2", 0, r=8)
    truth = ids[0].tolist()
    stray = next(v for v in range(3, 100) if v not in truth)
    text = truth[:6] + [stray] + truth[6:-1]
    replay = Replay(obs)
    replay.denoise(text, 128)
    (cosine,) = replay.cosines([text])
    found, found_cosine, _ = unroll._deletion(replay, text, cosine,
                                              lambda prefix: unroll._last_token(obs, replay, prefix, 128))
    assert found == truth and found_cosine > cosine, (found, truth)
    padded, _, _ = unroll._deletion(replay, text, cosine, lambda prefix: replay.pad)
    assert padded != truth


@pytest.mark.parametrize("seed", [0, 1])
def test_the_last_two_tokens_are_read_from_the_label_channel(seed: int) -> None:
    """A text whose last two tokens are wrong: the tail move takes the place before the last from the label
    channel's short list (the later label's term left as interference) and the end after it, and reads the
    sentence."""
    obs, ids = dropout_victim("gpt2", seed, r=8)
    truth = ids[0].tolist()
    text = truth[:-2] + [v for v in range(3, 100) if v not in truth][:2]
    replay = Replay(obs)
    replay.denoise(text, 128)
    (cosine,) = replay.cosines([text])
    found, found_cosine, _ = unroll._tail(replay, text, cosine,
                                          lambda prefix: unroll._last_token(obs, replay, prefix, 128),
                                          unroll._next_reader(obs, 128))
    assert found == truth and found_cosine > cosine


def test_where_every_position_looks_confirmed_the_least_confirmed_is_scanned_in_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise can lift a wrong token's fall over the confirmation level: with no position below it, the refill's
    in-place scan goes to the least confirmed position (then the next, once that one was scanned in vain)."""

    class Flat:  # a replay under which no change raises the cosine
        pad = 0

        def cosines(self, texts: list[list[int]]) -> list[float]:
            return [0.0] * len(texts)

    scanned = []

    def record(replay: object, text: list[int], cosine: float, position: int, shortlist: int,
               inserted: bool = False) -> tuple[list[int], float, int]:
        scanned.append((position, inserted))
        return text, cosine, 0

    monkeypatch.setattr(unroll, "_fill_position", record)
    falls = [0.30, 0.20, 0.25, 0.22, 0.28]  # level: half the median fall, 0.125: every position confirmed
    unroll._refill(Flat(), [5, 6, 7, 8, 9], 0.5, falls, steps=2, shortlist=4, done=0.9999,
                   last=lambda prefix: 0)
    assert [p for p, inserted in scanned if not inserted] == [1, 3]


def test_consistency_tells_the_clients_text_from_one_wrong_token_or_a_deletion() -> None:
    """The received update is one more draw of the client's dropout noise at the true text, so the truth's rank
    p-value among the server's own draws is uniform; a wrong token in the middle or a deleted token puts the
    update below nearly all of the text's own draws (seeds 0-2; on this tiny random-token victim 3 of 30 wrong
    texts over seeds 0-9 still reached 0.25, none 0.5: docs/audit.md)."""
    truth_p, wrong_p = [], []
    for seed in range(3):
        obs, ids = dropout_victim("gpt2", seed, r=8)
        truth = ids[0].tolist()
        replay = Replay(obs)
        wrong = list(truth)
        wrong[len(truth) // 2] = (wrong[len(truth) // 2] + 1) % 2000
        deleted = truth[:3] + truth[4:] + [truth[-1]]
        truth_p.append(replay.consistency(truth, samples=64, directions=128))
        wrong_p += [replay.consistency(t, samples=64, directions=128) for t in (wrong, deleted)]
    assert min(truth_p) > 0.2, truth_p
    assert max(wrong_p) < 0.1, wrong_p


def test_the_refill_stops_once_the_text_is_consistent_with_the_update() -> None:
    """With dropout the cosine never reaches ``done``: from the client's own text the refill without a stop rule
    scans on through every step; with the consistency rule it ends after the first step that found nothing
    better, with the same text and fewer replays."""
    obs, ids = dropout_victim("gpt2", 0, r=8)
    truth = ids[0].tolist()
    replay = Replay(obs)
    replay.denoise(truth, 128)
    (cosine,) = replay.cosines([truth])
    falls = unroll._falls(replay, truth, cosine)
    runs = {}
    for name, stop in (("never", None), ("consistent", lambda t: replay.consistency(t, 64, 128) >= 0.25)):
        found, _, _, spent = unroll._refill(replay, truth, cosine, falls, 2, 32, 0.9999,
                                            lambda prefix: unroll._last_token(obs, replay, prefix, 128), stop=stop)
        runs[name] = (found, spent)
    assert runs["never"][0] == runs["consistent"][0] == truth, runs
    assert runs["consistent"][1] < runs["never"][1], runs
