"""Everything a process needs to train or evaluate for one configuration, loaded once.

A :class:`Runtime` holds the tokenizer, the frozen base model wrapped with the adapter, the data
split into client partitions and the held-out global eval set. A :class:`RuntimeCache` keeps it per
process: the in-process engine hands its cache to the server and every virtual client, so they share
one runtime (one base model; adapters are swapped in and out); in a deployment each ClientApp process
builds its own. Plug-ins (split learning) attach to a runtime through :meth:`Runtime.plugin` and
:meth:`Runtime.restrict_adapter`; this module imports none of them. Flower-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Collection, Sequence
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

# Flower's simulation process imports the ServerApp and the ClientApp in two threads at once. Entering
# torch through a submodule locks that submodule before ``torch`` itself, and if the other thread is
# inside ``import torch`` Python's import-deadlock detection hands one of them a half-initialised
# torch ("cannot import name ... from partially initialized module"). So: ``import torch`` first,
# in every module (tests/test_static.py checks it).
import torch  # noqa: F401
from torch.utils.data import Dataset

from fedpeft import data, models, personal, precision
from fedpeft.compression import Layout
from fedpeft.config import Config
from fedpeft.partition import client_eval_split
from fedpeft.training import select_device

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runtime:
    """Model, adapter and data for one configuration (built lazily, cached per process)."""

    def __init__(self, cfg: Config, data_path: str | None = None, label_names: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        self.device = select_device(cfg.run.device)
        precision.check_hardware(cfg.model, self.device)  # dtype / QLoRA / device_map refused before any loading
        precision.warn_emulated_bf16(cfg, self.device)
        if data_path:  # a deployed node's own file: all of it is partition 0, no global eval split
            node_data = dataclasses.replace(cfg.data, source="file", path=data_path)
            self.examples = data.load_examples(node_data, cfg.model.task, seed=cfg.run.seed,
                                               label_names=label_names if cfg.model.task == "classification" else None)
            self.train_examples, self.eval_examples = self.examples, self.examples.subset([])
            self.partitions = [np.arange(len(self.examples))]
        else:
            self.examples = data.load_examples(cfg.data, cfg.model.task, seed=cfg.run.seed)
            self.train_examples, eval_examples = data.split_eval(self.examples, cfg.data.eval_fraction,
                                                                 cfg.run.seed)
            if cfg.train.max_eval_examples and len(eval_examples) > cfg.train.max_eval_examples:
                eval_examples = eval_examples.subset(np.arange(cfg.train.max_eval_examples))
            self.eval_examples = eval_examples
            self.partitions = data.partition(self.train_examples, cfg.data, cfg.run.seed)
        # federated evaluation: each client holds part of its data out; it trains on the rest only
        splits = [client_eval_split(p, cfg.data.client_eval_fraction, cfg.run.seed, pid)
                  for pid, p in enumerate(self.partitions)]
        self.partitions = [train for train, _ in splits]
        self.client_eval_partitions = [held for _, held in splits]
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.collate = data.Collator(self.tokenizer.pad_token_id, cfg.model.task)
        self._client_data: dict[int, Dataset] = {}
        self._client_eval_data: dict[int, Dataset] = {}
        self._adapter_keys: list[str] | None = None
        self._plugins: dict[str, Any] = {}

    @cached_property
    def model(self):  # noqa: ANN201 - a peft model
        """The peft-wrapped model on the device; its adapter is the seeded initial one until swapped."""
        num_labels = len(self.examples.label_names) if self.cfg.model.task == "classification" else 0
        base = models.load_base_model(self.cfg.model, num_labels=num_labels, seed=self.cfg.run.seed)
        model = models.build_peft_model(base, self.cfg.adapter, self.cfg.model.task, seed=self.cfg.run.seed,
                                        freeze_a=self.cfg.federation.lora_aggregation == "freeze_a")
        self.initial_state = models.adapter_state(model)
        kept = personal.markers(self.cfg.federation.lora_aggregation, self.cfg.federation.personalization)
        if kept:  # share_a's B, a personal head: they stay on the client (fedpeft/personal.py)
            self._adapter_keys = [k for k in self.initial_state if not personal.is_personal(k, kept)]
        return precision.place(model, self.device).eval()

    def initial_adapter(self) -> models.AdapterState:
        """The seeded initial adapter (identical in every process for the same config): the tensors that
        travel, all of them unless a plug-in restricted them (split learning: only the client side)."""
        _ = self.model
        keys = self._adapter_keys if self._adapter_keys is not None else self.initial_state.keys()
        return {k: self.initial_state[k].clone() for k in keys}

    def full_state(self, shared: models.AdapterState) -> models.AdapterState:
        """Every trainable tensor: ``shared`` (what travels) over the seeded initial ones (share_a's personal B)."""
        _ = self.model
        return {**self.initial_state, **shared}

    @cached_property
    def layout(self) -> Layout:
        """Names and shapes of the adapter tensors (what every payload is checked against)."""
        return Layout.from_state(self.initial_adapter())

    def restrict_adapter(self, keys: Collection[str], drop_others: bool = False) -> None:
        """Only ``keys`` travel from now on (``drop_others``: nor keep the other tensors' initial copy)."""
        _ = self.model
        self._adapter_keys = list(keys)
        if drop_others:
            self.initial_state = {k: v for k, v in self.initial_state.items() if k in self._adapter_keys}
        self.__dict__.pop("layout", None)

    def plugin(self, name: str, build: Callable[[], T]) -> T:
        """The plug-in ``name`` of this runtime (built by ``build`` on first use, then shared)."""
        if name not in self._plugins:
            self._plugins[name] = build()
        return self._plugins[name]

    def client_dataset(self, partition_id: int) -> Dataset:
        """The tokenized local training data of one client (cached: clients are revisited across rounds)."""
        return self._tokenized(self.partitions, self._client_data, partition_id)

    def client_eval_dataset(self, partition_id: int) -> Dataset:
        """The tokenized held-out split of one client (data.client_eval_fraction; empty when 0; cached)."""
        return self._tokenized(self.client_eval_partitions, self._client_eval_data, partition_id)

    def _tokenized(self, parts: list[np.ndarray], cache: dict[int, Dataset], partition_id: int) -> Dataset:
        if not 0 <= partition_id < len(parts):
            raise ValueError(f"partition-id {partition_id} out of range 0..{len(parts) - 1}")
        if partition_id not in cache:
            cache[partition_id] = data.tokenize(self.train_examples.subset(parts[partition_id]), self.tokenizer,
                                                self.cfg.model.max_length, self.cfg.model.task,
                                                self.cfg.data.prompt_template)
        return cache[partition_id]

    @cached_property
    def eval_dataset(self) -> Dataset:
        """The tokenized held-out global eval set."""
        return data.tokenize(self.eval_examples, self.tokenizer, self.cfg.model.max_length, self.cfg.model.task,
                             self.cfg.data.prompt_template)


class RuntimeCache:
    """The runtimes of one process, by configuration (one at a time: a new config replaces the old one).

    An engine owns one and hands it to the ServerApp and ClientApps it runs (through their ``Context``,
    see :func:`runtimes_of`); a process that Flower starts for an app uses :data:`PROCESS_RUNTIMES`.
    """

    def __init__(self) -> None:
        self._runtimes: dict[str, Runtime] = {}

    def get(self, cfg: Config, data_path: str | None = None, label_names: Sequence[str] | None = None) -> Runtime:
        """The runtime for ``cfg``, built on first use.

        ``data_path`` (a deployed node's ``data-path``) replaces the scenario data by that whole file, its labels
        numbered by the scenario's ``label_names`` if given (``fedpeft run`` sends them in the run config).
        """
        names = tuple(str(n) for n in label_names) if data_path and label_names is not None else None
        key = hashlib.sha256((cfg.to_toml() + "\0" + (data_path or "") + "\0" + repr(names)).encode()).hexdigest()
        if key not in self._runtimes:
            self._runtimes.clear()
            self._runtimes[key] = Runtime(cfg, data_path, names)
        return self._runtimes[key]


PROCESS_RUNTIMES = RuntimeCache()  # this process's own: for apps Flower starts, and code outside any engine


def runtimes_of(context: object) -> RuntimeCache:
    """The cache an engine handed to an app through its Flower ``context`` (``context.runtimes``), else
    :data:`PROCESS_RUNTIMES` (a ClientApp / ServerApp process that Flower started)."""
    runtimes = getattr(context, "runtimes", None)
    return runtimes if isinstance(runtimes, RuntimeCache) else PROCESS_RUNTIMES


def get_runtime(cfg: Config, data_path: str | None = None, label_names: Sequence[str] | None = None) -> Runtime:
    """This process's runtime for ``cfg`` (what the in-process engine used by default): for tests, benchmarks and
    post-run work outside any engine."""
    return PROCESS_RUNTIMES.get(cfg, data_path, label_names)
