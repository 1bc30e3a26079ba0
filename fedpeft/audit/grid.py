"""The audit grid: parse ``key=v1,v2`` axes into cells, and produce one cell's observation the way a
real client produces its reply.

A cell's client trains with :func:`fedpeft.training.train_local` (the ClientApp's own loop: its
optimizer, gradient clip, and Opacus DP-SGD through :class:`fedpeft.privacy.LocalDP`), then sends its
delta through :func:`fedpeft.update.encode_update`, the ClientApp's own pipeline (error feedback,
client-level clip, the real codec, decode, server-side clip). The attacker gets what the server
aggregates; the payload size and the real accountant's epsilon are recorded beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset

from fedpeft import config
from fedpeft.attacks.observation import Observation, State, config_dropout, public_schedule
from fedpeft.audit.victim import Truth, VictimSource, _later_round, victim_source
from fedpeft.compression import Layout, make_codec
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.update import encode_update, error_feedback

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)


def _int(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise ValueError(f"must be >= {lo}, got {value}")
        return value
    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"choose one of {', '.join(choices)}; got {text!r}")
        return text
    return parse


def _codec(text: str) -> str:
    make_codec(text)  # ConfigError names the known codecs
    return text


def _targets(text: str) -> str:
    mods = [m for m in text.split("+") if m]
    if not mods:
        raise ValueError("expected module names joined by '+', e.g. q_proj+k_proj+v_proj, or 'default'")
    return "+".join(mods)


def parse_dp(text: str) -> tuple[str, str, float]:
    """``none`` | ``local:Z`` | ``local:eps=E`` | ``client:Z`` -> (mode, "z" or "eps", value)."""
    if text == "none":
        return "none", "z", 0.0
    mode, _, arg = text.partition(":")
    if mode not in ("local", "client") or not arg:
        raise ValueError(f"expected none, local:Z, local:eps=E or client:Z; got {text!r}")
    kind, value_text = ("eps", arg[4:]) if arg.startswith("eps=") else ("z", arg)
    if mode == "client" and kind == "eps":
        raise ValueError("client-level DP takes a noise multiplier (client:Z), not a target epsilon")
    try:
        value = float(value_text)
    except ValueError:
        raise ValueError(f"{text!r}: {value_text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{text!r}: the noise multiplier / epsilon must be > 0")
    return mode, kind, value


def _dp(text: str) -> str:
    parse_dp(text)
    return text


#: grid key -> (value parser, meaning). The order is the column order of the report.
GRID_KEYS: dict[str, tuple[Callable[[str], Any], str]] = {
    "batch_size": (_int(1), "examples in the client's private batch (its whole local data)"),
    "rank": (_int(1), "LoRA rank r"),
    "targets": (_targets, "LoRA target modules joined by '+', e.g. q_proj+k_proj+v_proj ('default': peft's)"),
    "steps": (_int(1), "local optimizer steps per round (1 + sgd = a single-step gradient)"),
    "optimizer": (_choice("sgd", "adamw"), "local optimizer"),
    "round": (_choice("first", "later"), "first: global adapter at init (LoRA B = 0); later: a trained one"),
    "rounds": (_int(1), "rounds of the same client (same data) the server stacks"),
    "codec": (_codec, "uplink codec spec; its density p is reported"),
    "dp": (_dp, "none | local:Z (DP-SGD noise multiplier) | local:eps=E (target) | client:Z (clip + server noise)"),
    "observed": (_choice("all", "lora_A", "lora_B"),
                 "LoRA tensors the attacker is given: all (the real reply), or one channel in isolation"),
}


def _bad_key(key: str) -> ConfigError:
    return ConfigError(f"unknown audit grid key {key!r}; valid keys: {', '.join(GRID_KEYS)}")


def parse_grid(entries: list[str]) -> dict[str, list[Any]]:
    """``["batch_size=1,4", "codec=none,compeft:0.05,scale=std"]`` -> {key: [values]}.

    A comma-separated token starts a new axis only when it is ``grid_key=...``; anything else
    (a codec option such as ``scale=std``, or a value split off by ``--set``) continues the current
    axis. A key given twice: the later one wins.
    """
    axes: dict[str, list[str]] = {}
    current: str | None = None
    for token in (t.strip() for e in entries for t in e.split(",") if t.strip()):
        key, eq, rest = token.partition("=")
        if eq and key.strip() in GRID_KEYS:
            current = key.strip()
            axes[current] = [rest.strip()] if rest.strip() else []
        elif current is None:
            raise _bad_key(key.strip()) if eq else ConfigError(
                f"audit grid entry {token!r}: expected key=v1,v2,... with a key among: {', '.join(GRID_KEYS)}")
        elif eq and current == "codec" and axes[current]:  # codec option: belongs to the previous spec
            axes[current][-1] += "," + token
        elif eq and re.fullmatch(r"[A-Za-z_]+", key.strip()):
            raise _bad_key(key.strip())
        else:
            axes[current].append(token)
    out: dict[str, list[Any]] = {}
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"audit grid key {key!r} has no values (write {key}=v1,v2)")
        parser, meaning = GRID_KEYS[key]
        parsed = []
        for v in values:
            try:
                parsed.append(parser(v))
            except (ValueError, ConfigError) as e:
                raise ConfigError(f"audit grid {key}={v!r}: {e} ({meaning})") from None
        out[key] = list(dict.fromkeys(parsed))
    return out


def scenario_defaults(cfg: config.Config) -> dict[str, Any]:
    """Values of keys the grid does not vary, from the scenario."""
    p = cfg.privacy
    if p.mode in ("local", "both"):
        dp = f"local:eps={p.target_epsilon:g}" if p.target_epsilon > 0 else f"local:{p.noise_multiplier:g}"
    elif p.mode == "client":
        dp = f"client:{p.server_noise_multiplier:g}"
    else:
        dp = "none"
    tiny = {"tiny-llama": "q_proj+k_proj+v_proj", "tiny-gpt2": "c_attn"}
    if cfg.audit.victim == "scenario":
        targets = "+".join(cfg.adapter.target_modules) or "default"  # default: what peft picks for the model
    elif cfg.model.name in tiny:
        targets = "+".join(cfg.adapter.target_modules) or tiny[cfg.model.name]
    else:  # the tiny victim of a scenario with another model is tiny-llama
        targets = tiny["tiny-llama"]
    return {"batch_size": cfg.train.batch_size, "rank": cfg.adapter.r, "targets": targets,
            "steps": max(1, cfg.train.local_steps), "optimizer": cfg.train.optimizer, "round": "later",
            "rounds": 1, "codec": cfg.compression.uplink, "dp": dp, "observed": "all"}


def plan(cfg: config.Config, extra_grid: list[str] | None = None) -> list[dict[str, Any]]:
    """Every cell of the scenario's grid (``audit.grid`` overridden axis by axis by ``extra_grid``)."""
    axes = parse_grid(list(cfg.audit.grid))
    axes.update(parse_grid(list(extra_grid or [])))
    if cfg.adapter.type != "lora":
        raise ConfigError(f"fedpeft audit builds LoRA victims: set adapter.type = 'lora' (got {cfg.adapter.type!r})")
    base = scenario_defaults(cfg)
    keys = list(GRID_KEYS)
    values = [axes.get(k, [base[k]]) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


@dataclass
class ClientView:
    """One cell's observation, the private truth (metrics only) and what the run would report."""

    obs: Observation
    truth: Truth
    epsilon: float
    payload_bytes: int
    dense_bytes: int
    density: float
    utility_cos: float


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([it["input_ids"] for it in items])
    labels = torch.stack([it["labels"] for it in items]) if "labels" in items[0] else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _cosine(a: State, b: State) -> float:
    x = torch.cat([a[k].double().flatten() for k in sorted(a)])
    y = torch.cat([b[k].double().flatten() for k in sorted(a)])
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den else 0.0


def _local_dp(cfg: config.Config, mode: str, kind: str, value: float, n: int, total_steps: int, seed: int) -> Any:
    from fedpeft.privacy import LocalDP

    pcfg = dataclasses.replace(cfg.privacy, mode="local", noise_multiplier=value if kind == "z" else 0.0,
                               target_epsilon=value if kind == "eps" else 0.0)
    return LocalDP(pcfg, dataset_size=n, batch_size=n, total_steps=total_steps, seed=seed)


def _victim_model(cfg: config.Config, cell: dict[str, Any], src: VictimSource, seed: int) -> PeftModel:
    """The cell's peft model: the source's base (a fresh copy) with a LoRA of the cell's rank and targets."""
    from fedpeft.models import build_peft_model, load_base_model

    targets = [] if cell["targets"] == "default" else cell["targets"].split("+")
    adapter = dataclasses.replace(cfg.adapter, type="lora", r=cell["rank"], target_modules=targets)
    if src.kind == "tiny":
        adapter = dataclasses.replace(adapter, dropout=0.0, train_head=False)
    base = copy.deepcopy(src.base) if src.base is not None else load_base_model(src.model, seed=seed % 3)
    try:
        return build_peft_model(base, adapter, src.task, seed=seed)
    except FedPeftError as e:
        raise ConfigError(f"audit cell {cell}: {e}") from None


def client_view(cfg: config.Config, cell: dict[str, Any], seed: int, src: VictimSource | None = None) -> ClientView:
    """Train one victim client for ``cell['rounds']`` rounds and return what the server decoded."""
    from fedpeft.models import adapter_state, set_adapter_state, subtract
    from fedpeft.privacy import ClientLevelAccountant
    from fedpeft.training import train_local

    src = src or victim_source(cfg)
    model = _victim_model(cfg, cell, src, seed)
    b, seq_len, rounds = cell["batch_size"], cfg.audit.seq_len, cell["rounds"]
    ids, labels = src.batch(b, seq_len, seed, cfg.audit.text)
    rows = [{"input_ids": row} if labels is None else {"input_ids": row, "labels": y}
            for row, y in zip(ids, labels if labels is not None else ids)]
    # a list of examples: DataLoader reads any indexable, sized container (torch types it as a Dataset)
    dataset = cast("Dataset[dict[str, Any]]", rows)
    train = dataclasses.replace(cfg.train, batch_size=b, local_steps=cell["steps"], local_epochs=0.0,
                                optimizer=cell["optimizer"])
    mode, kind, value = parse_dp(cell["dp"])
    ldp = _local_dp(cfg, mode, kind, value, b, rounds * cell["steps"], seed) if mode == "local" else None
    codec = make_codec(cell["codec"])
    ef = error_feedback(codec, cfg.compression.error_feedback)
    init = adapter_state(model)
    layout = Layout.from_state(init)
    pairs: list[tuple[State, State]] = []
    nbytes, cos = 0, 1.0
    for rnd in range(rounds):
        fresh = cell["round"] == "first" and rnd == 0
        g_state = init if fresh else _later_round(init, seed * 100 + rnd, cfg.audit.later_scale)
        set_adapter_state(model, g_state)
        cpu = torch.device("cpu")
        if ldp is not None:  # utility reference: the same client's round without DP
            train_local(model, dataset, _collate, train, cpu, seed=seed * 1000 + rnd)
            reference = subtract(adapter_state(model), g_state)
            set_adapter_state(model, g_state)
        fisher = train_local(model, dataset, _collate, train, cpu, seed=seed * 1000 + rnd, dp=ldp,
                             fisher=codec.wants_fisher).fisher
        clean = subtract(adapter_state(model), g_state)
        reference = reference if ldp is not None else clean
        enc = encode_update(clean, codec, layout, rng=np.random.default_rng(seed * 1000 + rnd), fisher=fisher,
                            ef=ef, clip=cfg.privacy.clip_norm if mode == "client" else None)
        decoded = enc.sent
        nbytes, cos = enc.payload.nbytes, _cosine(decoded, reference)
        if cell["observed"] != "all":  # isolate one channel: the other LoRA tensors are withheld (zero)
            decoded = {k: v if f".{cell['observed']}." in k else torch.zeros_like(v) for k, v in decoded.items()}
        pairs.append((g_state, decoded))
    set_adapter_state(model, pairs[-1][0])
    model.eval()
    if ldp is not None:
        epsilon = ldp.epsilon()
    elif mode == "client":
        acc = ClientLevelAccountant(cfg.privacy.accountant, cfg.privacy.client_sampling)  # as the run charges it
        m = cfg.federation.clients_per_round or cfg.data.num_clients
        for _ in range(rounds):
            acc.step(value, min(1.0, m / cfg.data.num_clients))
        epsilon = acc.epsilon(cfg.privacy.delta)
    else:
        epsilon = math.inf
    obs = _observation(model, pairs, train, b, seq_len, src.task)
    density = float(getattr(codec.params, "p", 1.0))
    return ClientView(obs, Truth(ids, labels, vocab_size=model.get_input_embeddings().num_embeddings), epsilon,
                      nbytes, 4 * layout.total, density, cos)


def _observation(model: torch.nn.Module, pairs: list[tuple[State, State]], train: config.TrainSection, b: int,
                 seq_len: int, task: str) -> Observation:
    """The server's observation. A one-step SGD delta at a constant, public lr is −lr·gradient, so the
    server rescales it to the gradient (what the label channel of ``span_decode`` needs). The client trained
    with dropout on (``train_local``): its rate, read from the public configs, is part of the observation."""
    single = (train.local_steps == 1 and train.optimizer == "sgd" and train.weight_decay == 0
              and train.schedule == "constant" and train.warmup_steps == 0 and train.lr > 0)
    kind = "gradient" if single else "delta"
    if single:
        pairs = [(g, {k: v * (-1.0 / train.lr) for k, v in u.items()}) for g, u in pairs]
    return Observation(model=model, global_state=pairs[-1][0], update=pairs[-1][1], kind=kind, history=pairs[:-1],
                       batch_size=b, num_examples=b, seq_len=seq_len, local_steps=train.local_steps, lr=train.lr,
                       optimizer=train.optimizer, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
                       schedule=public_schedule(train), task=task, dropout=config_dropout(model))
