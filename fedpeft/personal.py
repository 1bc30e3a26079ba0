"""Personal adapter tensors: the ones that stay on the client and never travel in a message.

``federation.lora_aggregation = "share_a"`` keeps LoRA's ``B`` (FedSA-LoRA); ``federation.personalization =
"head"`` keeps the classification head (peft's ``modules_to_save`` copy), so each client trains its own head on
top of the shared adapter. The runtime leaves these tensors out of the layout, so no codec, downlink, SecAgg+
vector or checkpointed global state can carry them; the client keeps them in its node state
(``clients/app.py``) and the server's copy stays at the seeded init.
"""

from __future__ import annotations

from fedpeft import lora

HEAD = ".modules_to_save."  # peft's trainable copy of the classification head (classifier / score)


def markers(lora_aggregation: str, personalization: str) -> tuple[str, ...]:
    """The key fragments of the tensors that stay on the client under these settings (empty: all travel)."""
    return ((lora.PERSONAL,) if lora_aggregation == "share_a" else ()) + ((HEAD,) if personalization == "head" else ())


def is_personal(key: str, found: tuple[str, ...]) -> bool:
    """Whether adapter tensor ``key`` stays on the client (``found``: :func:`markers`)."""
    return any(m in key for m in found)
