"""Flower ClientApp: receive the global adapter, train locally, send the encoded delta."""

from __future__ import annotations

import json
from collections.abc import Mapping

from flwr.app import Context

from fedpeft.config import Config
from fedpeft.errors import PayloadError
from fedpeft.runtime import Runtime, runtimes_of


def label_names(run_config: Mapping[str, object]) -> list[str] | None:
    """The scenario's label names from the run config (``label-names``, a JSON list; None if absent).

    A deployed node numbers the labels of its own data file by them, so its head matches the server's.
    """
    raw = str(run_config.get("label-names", "") or "")
    if not raw:
        return None
    names = json.loads(raw)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PayloadError(f"run config label-names must be a JSON list of strings, not {raw[:80]!r}")
    return names


def node_runtime(cfg: Config, context: Context) -> Runtime:
    """This node's runtime, from the cache its engine passed in ``context`` (else this process's): its own data
    file (node config ``data-path``) numbered by the scenario's labels, or the scenario's partitions in a simulation."""
    data_path = str(context.node_config.get("data-path", "")) or None
    return runtimes_of(context).get(cfg, data_path, label_names(context.run_config))
