"""Aggregation plug-ins, registered by name (``federation.strategy``); see :mod:`.base` for the interface.

Flower's own strategy classes hold their state inside their round loop on dense weight arrays; our
deltas arrive compressed and the loop owns sampling, DP and checkpoints, so the update rules live
here, on plain tensors. A new aggregator is one module registering one :class:`Aggregator` subclass.
"""

from fedpeft.server.aggregators import cosine, fedavg, fedopt, krum, lora, robust, scaffold  # noqa: F401  (register the aggregators)
from fedpeft.server.aggregators.base import (
    AGGREGATORS,
    LORA_AGGREGATORS,
    Aggregator,
    make_aggregator,
    mean_update,
    weighted_mean,
)

__all__ = ["AGGREGATORS", "LORA_AGGREGATORS", "Aggregator", "make_aggregator", "mean_update", "weighted_mean"]
