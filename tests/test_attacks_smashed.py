"""The smashed-data inversion attack on split learning (``fedpeft.attacks.smashed``).

Victims: tiny split models (3 blocks, d=32, LoRA r=4, byte-level 16-token text of random words), a
"later round" client adapter the server knows, one real :class:`SplitClient` step (dropout on, as in
training) against an in-process body; the attacker gets the forward/backward messages as sent and
its own rebuild of the model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft import models
from fedpeft.attacks import NotApplicable, Observation, run_attack
from fedpeft.attacks.metrics import summarize
from fedpeft.attacks.smashed import SplitObservation
from fedpeft.audit.victim import make_victim, private_batch
from fedpeft.config import AdapterSection, ModelSection, TrainSection
from fedpeft.split.body import BodyServer
from fedpeft.split.client import SplitClient, SplitOptions
from fedpeft.split.cut import SplitModel, cut_model
from fedpeft.training import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = 3


def _split(name: str, front: int, adapter: str = "lora") -> SplitModel:
    task = "classification" if name == "tiny-bert" else "causal_lm"
    mc = ModelSection(name=name, task=task, tiny_hidden_size=32, tiny_layers=LAYERS, max_length=32)
    base = models.load_base_model(mc, num_labels=2, seed=0)
    peft = models.build_peft_model(base, AdapterSection(type=adapter, r=4, num_virtual_tokens=3), task, seed=0)
    return cut_model(peft, task, front, LAYERS - front - 1)


def _victim(name: str, front: int, noise: float = 0.0, seed: int = 0, batch: int = 1, adapter: str = "lora",
            pad: int = 0) -> tuple[SplitObservation, torch.Tensor]:
    """One real split step; returns what the server observes and the private ids (ground truth)."""
    split = _split(name, front, adapter)
    g = torch.Generator().manual_seed(seed + 1000)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in split.client_state().items()}
    split.set_client_state(state)  # a later round's (aggregated) client adapter, known to the server
    ids = private_batch(batch, 16, seed)
    mask = torch.ones_like(ids)
    if pad:
        ids[:, -pad:], mask[:, -pad:] = 0, 0
    labels = torch.zeros(batch, dtype=torch.long) if split.task == "classification" else ids.clone()
    cfg = TrainSection(local_steps=1, batch_size=batch, lr=0.01, max_grad_norm=0.0)
    server = BodyServer.from_split(split, cfg)
    client = SplitClient(split, server, "c0", cfg, SplitOptions(activation_noise=noise), seed=seed)
    optimizer = make_optimizer(list(split.client_parameters().values()), cfg)
    server.open("c0", split.fingerprint)
    split.peft_model.train()  # a training step: dropout on
    torch.manual_seed(seed)
    client.split_step({"input_ids": ids, "attention_mask": mask, "labels": labels}, optimizer)
    server.close("c0")
    forward, backward = client.sent_log  # exactly what crossed the wire
    obs = SplitObservation.from_wire(_split(name, front, adapter), forward, backward, client_state=state,
                                     activation_noise=noise)
    return obs, ids


def _score(name: str, front: int, seeds: range, noise: float = 0.0, params: dict | None = None,
           **kw: object) -> dict[str, float]:
    rows = []
    for seed in seeds:
        obs, ids = _victim(name, front, noise, seed, **kw)  # type: ignore[arg-type]
        rows.append(summarize(run_attack("smashed", obs, **(params or {})), ids))
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("positional_accuracy", "token_f1", "exact")}


def test_observation_carries_only_what_the_server_sees() -> None:
    names = {f.name for f in dataclasses.fields(SplitObservation)}
    assert not names & {"input_ids", "labels", "truth", "tokens", "logits"}
    obs, _ = _victim("tiny-gpt2", 1)
    assert obs.hidden.dtype == torch.float32 and obs.hidden.shape == (1, 16, 32)
    with pytest.raises(ValueError):
        SplitObservation.from_wire(obs.split, {"hidden": obs.hidden, "attention_mask": obs.attention_mask,
                                               "input_ids": torch.zeros(1, 16, dtype=torch.long)})


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_front_layers_zero_is_decoded_exactly(name: str) -> None:
    row = _score(name, 0, range(2))
    assert row["positional_accuracy"] == 1.0 and row["exact"] == 1.0 and row["token_f1"] == 1.0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_causal_front_is_inverted_left_to_right(name: str) -> None:
    row = _score(name, 1, range(2), batch=2)
    assert row["positional_accuracy"] >= 0.95 and row["exact"] >= 0.95  # measured: 1.0 (dropout on)


def test_causal_search_is_certified_without_dropout_and_handles_padding() -> None:
    obs, ids = _victim("tiny-llama", 2, pad=4)  # LLaMA has no dropout: the match is exact to rounding
    result = run_attack("smashed", obs)
    assert result.extra["method"] == "causal" and result.extra["certified"] == [True]
    assert result.sequences == ids.tolist()


def test_bidirectional_front_by_coordinate_search() -> None:
    row = _score("tiny-bert", 1, range(2))
    assert row["positional_accuracy"] >= 0.95  # measured: 1.0


def test_soft_prompt_positions_are_skipped() -> None:
    obs, ids = _victim("tiny-gpt2", 1, adapter="prompt")
    assert obs.hidden.shape[1] == 16 + 3
    assert summarize(run_attack("smashed", obs), ids)["positional_accuracy"] == 1.0


@pytest.mark.parametrize("name, front, noise", [("tiny-gpt2", 0, 0.1), ("tiny-gpt2", 1, 0.1),
                                                ("tiny-bert", 0, 3.0)])
def test_large_activation_noise_brings_recovery_toward_chance(name: str, front: int, noise: float) -> None:
    clean = _score(name, front, range(2), 0.0)
    noisy = _score(name, front, range(2), noise)
    assert clean["positional_accuracy"] == 1.0
    assert noisy["positional_accuracy"] <= 0.15 and noisy["exact"] == 0.0  # measured: 0.0, 0.0, 0.08


def test_the_right_adapter_matters() -> None:
    """With a wrong client adapter (the server guesses the init instead of the round's), the causal
    search is no longer certified: the attack really uses the front it is given."""
    obs, ids = _victim("tiny-llama", 1)
    good = run_attack("smashed", obs)
    wrong = dataclasses.replace(obs, client_state={k: 3.0 * v for k, v in obs.client_state.items()}, _cache={})
    bad = run_attack("smashed", wrong)
    assert good.extra["certified"] == [True] and bad.extra["certified"] == [False]
    assert bad.extra["residual"][0] > 100 * good.extra["residual"][0]


def test_adapter_update_observations_are_not_applicable() -> None:
    obs, _ = make_victim(batch_size=1, seed=0, r=4, model="tiny-gpt2", hidden=32)
    assert isinstance(obs, Observation)
    with pytest.raises(NotApplicable):
        run_attack("smashed", obs)
    split_obs, _ = _victim("tiny-bert", 1)
    with pytest.raises(NotApplicable):
        run_attack("smashed", split_obs, method="causal")
