"""A split client that sends finite but absurd activations or gradients cannot spoil the split server's shared
adapters (every client's model), and a stream of refusals cannot flood the server's log. Driven through the real
dispatcher with real frames, in process (the transport itself: tests/test_split_hardening.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fedpeft import config
from fedpeft.split.frames import ErrorCode, Kind, Limits, decode, encode, open_text, session_token
from fedpeft.split.server import build_body, server_limits
from fedpeft.split.sessions import Dispatcher, Peer
from fedpeft.split.transport import DEFAULT_MAX_MESSAGE

from conftest import tiny_overrides, write_classification


class Split:
    """A body server with shared adapters behind the dispatcher, and two authenticated clients."""

    def __init__(self, tmp: Path) -> None:
        data = write_classification(tmp / "topics.jsonl")
        cfg = config.load(None, tiny_overrides(data, tmp / "runs", **{
            "split.enabled": True, "model.tiny_layers": 4, "split.front_layers": 1, "split.back_layers": 1,
            "split.server_adapters": "shared"}))
        self.body = build_body(cfg)
        limits = Limits(max_frame_bytes=DEFAULT_MAX_MESSAGE, max_decoded_bytes=4 * DEFAULT_MAX_MESSAGE,
                        require_finite=True, max_seq_len=self.body.max_seq_len, max_tokens=cfg.split.max_frame_tokens)
        self.dispatcher = Dispatcher(self.body, limits, False, None, 10, server_limits(cfg))
        self.hidden = cfg.model.tiny_hidden_size
        self.tokens = {}
        for who in ("alice", "mallory"):
            self.tokens[who] = session_token()
            opened = self.call(who, Kind.OPEN, 0, text=open_text(self.tokens[who], self.body.fingerprint))
            assert opened.kind == Kind.REPLY

    def call(self, who: str, kind: Kind, step: int, tensors: dict | None = None, text: str | None = None):
        frame = encode(kind, "c", step, tensors, text=self.tokens[who] if text is None else text)
        return decode(self.dispatcher.handle(frame, Peer(who, True)))

    def adapters(self) -> dict[str, torch.Tensor]:
        return self.body.adapter_state(None)

    def step(self, who: str, step: int, hidden: torch.Tensor, grad_scale: float = 0.01,
             mask: torch.Tensor | None = None):
        mask = torch.ones(hidden.shape[:2], dtype=torch.int64) if mask is None else mask
        out = self.call(who, Kind.FORWARD, step, {"hidden": hidden, "attention_mask": mask})
        if out.kind != Kind.REPLY:
            return out
        return self.call(who, Kind.BACKWARD, step, {"grad": torch.full_like(out.tensors["hidden"], grad_scale)})


@pytest.fixture
def split(tmp_path: Path) -> Split:
    return Split(tmp_path)


def _honest(split: Split, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 7, split.hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attack", ["activations 1e20", "gradient 3e38", "mask -1e30", "mask 0.5"])
def test_finite_but_absurd_input_is_refused_and_the_shared_adapters_stay(split: Split, attack: str) -> None:
    """Found by an outside review: activations of 1e20 overflowed inside the body and a gradient of 3e38 (both
    finite, so the frame check passed) made the shared adapters NaN for every client, saved to disk at close."""
    assert split.step("alice", 1, _honest(split)).kind == Kind.REPLY
    before = {k: v.clone() for k, v in split.adapters().items()}
    hidden, scale, mask = _honest(split, 1), 0.01, None
    if attack == "activations 1e20":
        hidden = torch.full_like(hidden, 1e20)
    elif attack == "gradient 3e38":
        scale = 3e38
    else:
        mask = torch.full(hidden.shape[:2], float(attack.split()[1]))
    answer = split.step("mallory", 1, hidden, scale, mask)
    assert answer.kind == Kind.ERROR and answer.code == ErrorCode.REJECTED, answer.text
    after = split.adapters()
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing applied
    reply = split.step("alice", 2, _honest(split, 2))  # the honest client trains on
    assert reply.kind == Kind.REPLY and all(bool(torch.isfinite(t).all()) for t in reply.tensors.values())
    assert all(bool(torch.isfinite(v).all()) for v in split.adapters().values())
    assert not all(torch.equal(split.adapters()[k], before[k]) for k in before)


def test_a_flood_of_refusals_is_logged_sparsely(split: Split, caplog: pytest.LogCaptureFixture) -> None:
    """Refused and failing requests were logged once each (500 requests: 500 records with tracebacks); now the 1st,
    2nd, 4th, 8th ... of each kind from one client, as malformed frames already were."""
    caplog.set_level(logging.WARNING)
    for i in range(200):
        split.call("mallory", Kind.FORWARD, i + 1, {"hidden": _honest(split)})  # no attention_mask: refused
    assert sum("refused" in r.getMessage() for r in caplog.records) == 8  # 1, 2, 4, ..., 128
    assert not any(r.exc_info for r in caplog.records)
