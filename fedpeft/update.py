"""The client update pipeline, Flower-free: what becomes of an adapter delta before it leaves a client.

::

    x       = delta + residual                    error feedback (biased codecs, if enabled)
    x, norm = clip_update(x, C)                   client-level DP: bound what goes into the codec
    payload = encode(x)                           the uplink codec (seeded rng, optional Fisher ranking)
    sent    = clip_to_norm(decode(payload), C)    bound what comes out: exactly what the server aggregates
    residual = x - sent                           error feedback keeps what was dropped or shrunk

The ClientApp sends ``payload``; the audit grid and the victim builders attack ``sent``. All of them
call :func:`encode_update`, so the audit attacks exactly what a client sends. Why the clip comes twice:
:mod:`fedpeft.privacy.client_dp`. Flower-side state (the residual kept in ``context.state``) stays in
the ClientApp; this module works on plain dicts of tensors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.compression import Codec, ErrorFeedback, Layout, Payload
from fedpeft.privacy import AdaptiveClipper, clip_to_norm, clip_update

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EncodedUpdate:
    """One client's encoded update, and what the server will make of it."""

    payload: Payload
    #: decode(payload), clipped under client-level DP: exactly what the server aggregates
    sent: State
    #: under client-level DP: the pre-clip norm of the (compensated) delta and adaptive clipping's indicator
    update_norm: float | None
    clip_indicator: float | None
    #: wall time of compensate + clip + encode (not the decode the server would do anyway)
    encode_ms: float


def error_feedback(codec: Codec, enabled: bool) -> ErrorFeedback | None:
    """A fresh residual memory where this uplink needs one: error feedback on and a biased codec."""
    return ErrorFeedback() if enabled and codec.biased else None


def encode_update(delta: Mapping[str, torch.Tensor], codec: Codec, layout: Layout, *,
                  rng: np.random.Generator | None, fisher: Mapping[str, torch.Tensor] | None = None,
                  ef: ErrorFeedback | None = None, clip: float | None = None) -> EncodedUpdate:
    """Run ``delta`` through the pipeline above and return the payload to send.

    ``ef`` (updated in place) compensates the delta and learns this round's residual; ``clip`` (client-level
    DP) bounds the update before and after coding. ``rng`` and ``fisher`` go to the codec.
    """
    t0 = time.perf_counter()
    x = ef.compensate(delta) if ef is not None else delta
    norm = indicator = None
    if clip is not None:
        x, norm = clip_update(x, clip)
        indicator = AdaptiveClipper.indicator(norm, clip)
    payload = codec.encode(x, layout, rng=rng, fisher=fisher)
    encode_ms = 1000 * (time.perf_counter() - t0)
    sent = codec.decode(payload, layout)
    if clip is not None:
        sent = clip_to_norm(sent, clip)
    if ef is not None:
        ef.update(x, sent)
    return EncodedUpdate(payload, sent, norm, indicator, encode_ms)
