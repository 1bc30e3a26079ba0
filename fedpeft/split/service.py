"""The contract between a split client and the server-side body of the model.

A split client holds the input side (embeddings + first blocks) and the output side (last blocks +
head + loss); the server holds the heavy middle. One training step is two calls:

1. ``forward(client_id, step, {"hidden": h, "attention_mask": m})`` -> ``{"hidden": body(h)}``
2. ``backward(client_id, step, {"grad": dL/d body(h)})`` -> ``{"grad": dL/dh}``; the server
   backpropagates through the body and steps its own adapters before it answers.

Tensors travel as a dict of named tensors. Only activations, their gradients and the attention
mask cross: never token ids, labels or logits. The in-process body (``split.body``) and the gRPC
proxy (``split.transport``) both implement :class:`BodyService`, so the split client does not know
which one it talks to.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

Tensors = dict[str, torch.Tensor]


@runtime_checkable
class BodyService(Protocol):
    """The server-side middle of a U-shaped split model, addressed per client."""

    def open(self, client_id: str, fingerprint: str) -> None:
        """Start (or rejoin) a session; raise ``SplitError`` if ``fingerprint`` (model + cut) differs."""

    def forward(self, client_id: str, step: int, tensors: Tensors) -> Tensors:
        """Run the body on the client's activations; keep what backward needs for ``(client_id, step)``."""

    def backward(self, client_id: str, step: int, tensors: Tensors) -> Tensors:
        """Backpropagate the client's output gradient, update the server adapters, return the input grad."""

    def close(self, client_id: str) -> None:
        """End the session and free what is held for this client."""
