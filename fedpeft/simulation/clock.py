"""The virtual clock: how long a federation of heterogeneous devices and links would take, in simulated seconds.

Each client gets a :class:`Device` (a compute slowdown on a reference device, uplink and downlink bandwidth,
one-way latency, availability, dropout), drawn once from seeded distributions (``[devices]`` and
``[network]``) or read from a CSV of device profiles. A message to a client then costs

    downlink latency + bytes_down * 8 / downlink rate / (1 - loss)     (the exact serialized message)
    + compute (local steps x step_seconds, FLOPs / rate, or the measured time, x the slowdown)
    + split-learning traffic (per step: one round trip, activations up, gradients down)
    + uplink latency + bytes_up * 8 / uplink rate / (1 - loss)           (the exact serialized reply)

An :class:`Availability` trace (``devices.availability_trace``) switches clients off and on in simulated time:
offline clients are not listed as connected, and a reply still in flight when its client goes off is lost.

Randomness (device draws, availability, dropout) comes from generators keyed by the run seed and what they
decide (client, round, stage), never from a shared stream, so the event log is the same for the same seed
whatever order the engine asks in. The engine (:mod:`fedpeft.simulation.inprocess`) owns the clock's time;
this module only does the arithmetic and the draws, and has no Flower import.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import Config
from fedpeft.errors import ConfigError

DISTRIBUTIONS = {"fixed": 1, "uniform": 2, "lognormal": 2, "pareto": (1, 2)}  # name -> number of parameters
PROFILE_COLUMNS = ("client", "slowdown", "uplink_mbps", "downlink_mbps", "latency_ms", "availability", "dropout")
TRACE_COLUMNS = ("client", "start", "end", "on", "off", "phase")
CLIENTS_FILE = "clients.jsonl"  # one line per message: the clock's events, or FedBuff's live flights
EVAL_STEP_SHARE = 1 / 3  # a forward-only evaluation batch costs about a third of a training step


def parse_distribution(key: str, spec: str) -> tuple[str, tuple[float, ...]]:
    """``"fixed:V"``, ``"uniform:LO,HI"``, ``"lognormal:MU,SIGMA"`` (of the log), ``"pareto:SHAPE[,SCALE]"``
    (classic Pareto, values >= SCALE, default 1), or a bare number (fixed); raises ConfigError naming ``key``."""
    text = spec.strip()
    name, _, args = text.partition(":") if ":" in text else ("fixed", "", text)
    allowed = "fixed:V, uniform:LO,HI, lognormal:MU,SIGMA, pareto:SHAPE[,SCALE] or a number"
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{key} = {spec!r}: unknown distribution {name!r}; use {allowed}")
    try:
        params = tuple(float(a) for a in args.split(","))
    except ValueError:
        raise ConfigError(f"{key} = {spec!r}: parameters must be numbers; use {allowed}") from None
    counts = DISTRIBUTIONS[name]
    if len(params) not in (counts if isinstance(counts, tuple) else (counts,)) or not all(map(math.isfinite, params)):
        raise ConfigError(f"{key} = {spec!r}: wrong parameters for {name}; use {allowed}")
    if (name == "fixed" and params[0] <= 0) or (name == "uniform" and not 0 < params[0] <= params[1]) or \
            (name == "lognormal" and params[1] < 0) or (name == "pareto" and min(params) <= 0):
        raise ConfigError(f"{key} = {spec!r}: values must be positive (uniform: 0 < LO <= HI; lognormal: SIGMA >= 0)")
    return name, params


def draw(spec: tuple[str, tuple[float, ...]], rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` values of a parsed distribution."""
    name, p = spec
    if name == "fixed":
        return np.full(n, p[0])
    if name == "uniform":
        return rng.uniform(p[0], p[1], n)
    if name == "lognormal":
        return rng.lognormal(p[0], p[1], n)
    scale = p[1] if len(p) > 1 else 1.0
    return scale * (1.0 + rng.pareto(p[0], n))  # numpy draws the Lomax (Pareto II); shift to the classic form


def keyed_rng(seed: int, *key: int | str) -> np.random.Generator:
    """A generator for one decision, keyed by the run seed and what it decides (order-independent)."""
    words = [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng([seed, *words])


@dataclass(frozen=True)
class Device:
    """One client's simulated device and link."""

    slowdown: float  # compute time multiplier on the reference device (2 = twice as slow)
    uplink_mbps: float
    downlink_mbps: float
    latency_s: float  # one-way, per message
    availability: float  # probability that the client is online when a message reaches it
    dropout: float  # probability that an online client drops out before it replies


def check_config(cfg: Config) -> None:
    """Every distribution spec parses, a profiles file, if named, exists, and buffered asynchronous FL gets
    only what it can run (before any work)."""
    if cfg.devices.clock and cfg.run.engine != "inprocess":
        raise ConfigError(f"devices.clock needs run.engine = 'inprocess' (got {cfg.run.engine!r}): only that engine "
                          "runs every client on one simulated clock")
    if cfg.federation.buffer_size:
        check_async(cfg)
    for section, key in (("devices", "slowdown"), ("network", "uplink_mbps"), ("network", "downlink_mbps"),
                         ("network", "latency_ms")):
        spec = parse_distribution(f"{section}.{key}", getattr(getattr(cfg, section), key))
        if key == "latency_ms" and spec[0] == "fixed" and spec[1][0] <= 0:
            raise ConfigError("network.latency_ms must be > 0")
    if cfg.devices.profiles and not Path(cfg.devices.profiles).expanduser().is_file():
        raise ConfigError(f"devices.profiles = {cfg.devices.profiles!r}: file not found (a CSV with columns "
                          f"{', '.join(PROFILE_COLUMNS)})")
    if cfg.devices.availability_trace:
        if not cfg.devices.clock:
            raise ConfigError("devices.availability_trace is read by the virtual clock: set devices.clock = true")
        read_trace(Path(cfg.devices.availability_trace).expanduser(), cfg.data.num_clients)  # refuse a bad file now


def check_async(cfg: Config) -> None:
    """FedBuff (federation.buffer_size > 0): what it needs and what it refuses, each naming the way out."""
    fed, n = cfg.federation, cfg.data.num_clients
    k = f"federation.buffer_size = {fed.buffer_size}"
    concurrency = fed.concurrency or fed.clients_per_round or n
    if cfg.run.engine != "inprocess":
        raise ConfigError(f"{k} (FedBuff) in a simulation needs run.engine = 'inprocess' (with devices.clock for "
                          f"heterogeneous devices; got {cfg.run.engine!r}); a deployment runs it on real time")
    if not fed.buffer_size <= concurrency <= n:
        raise ConfigError(f"{k} needs buffer_size <= federation.concurrency ({concurrency}) <= data.num_clients ({n})")
    if fed.min_clients > fed.buffer_size:
        raise ConfigError(f"federation.min_clients = {fed.min_clients} exceeds {k}")
    refused = {"privacy.mode": (cfg.privacy.mode, "none", "local"),
               "privacy.secure_aggregation": (cfg.privacy.secure_aggregation, "none"),
               "federation.lora_aggregation": (fed.lora_aggregation, "naive", "freeze_a", "share_a"),
               "federation.evaluation": (fed.evaluation, "server")}
    for key, (value, *allowed) in refused.items():
        if value not in allowed:
            why = (" (who contributes to an update is decided by device timing, not by the sample that client-level "
                   "DP's accounting assumes)" if key == "privacy.mode" else "")
            raise ConfigError(f"{k} (FedBuff) with {key} = {value!r} is not supported{why}; use "
                              f"{' or '.join(map(repr, allowed))}")
    if cfg.split.enabled:
        raise ConfigError(f"{k} (FedBuff) with split.enabled is not supported: set federation.buffer_size = 0")
    if fed.strategy == "scaffold":  # each control delta needs the c its client was sent
        raise ConfigError(f"{k} (FedBuff) with federation.strategy = 'scaffold' is not supported (its control "
                          "variates assume synchronous rounds): choose another strategy or federation.buffer_size = 0")
    from fedpeft.compression import make_codec

    if not make_codec(cfg.compression.downlink).lossless:
        raise ConfigError(f"{k} (FedBuff) needs a lossless compression.downlink (clients start from different "
                          f"versions; got {cfg.compression.downlink!r})")


def devices_for(cfg: Config, n: int) -> list[Device]:
    """The ``n`` clients' devices: seeded draws from ``[devices]`` / ``[network]``, overridden per client by the
    rows of ``devices.profiles``."""
    rng = keyed_rng(cfg.run.seed, "devices")
    columns = {"slowdown": draw(parse_distribution("devices.slowdown", cfg.devices.slowdown), rng, n),
               "uplink_mbps": draw(parse_distribution("network.uplink_mbps", cfg.network.uplink_mbps), rng, n),
               "downlink_mbps": draw(parse_distribution("network.downlink_mbps", cfg.network.downlink_mbps), rng, n),
               "latency_ms": draw(parse_distribution("network.latency_ms", cfg.network.latency_ms), rng, n),
               "availability": np.full(n, cfg.devices.availability), "dropout": np.full(n, cfg.devices.dropout)}
    if cfg.devices.profiles:
        for client, row in read_profiles(Path(cfg.devices.profiles).expanduser(), n).items():
            for name, value in row.items():
                columns[name][client] = value
    return [Device(float(columns["slowdown"][i]), float(columns["uplink_mbps"][i]),
                   float(columns["downlink_mbps"][i]), float(columns["latency_ms"][i]) / 1000,
                   float(columns["availability"][i]), float(columns["dropout"][i])) for i in range(n)]


def read_profiles(path: Path, n: int) -> dict[int, dict[str, float]]:
    """Rows of a device-profile CSV: ``client`` (0..n-1) and any of the other :data:`PROFILE_COLUMNS`."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        unknown = set(reader.fieldnames or ()) - set(PROFILE_COLUMNS)
        if "client" not in (reader.fieldnames or ()) or unknown:
            raise ConfigError(f"devices.profiles {path}: columns must be 'client' and any of "
                              f"{', '.join(PROFILE_COLUMNS[1:])}; got {reader.fieldnames}")
        rows: dict[int, dict[str, float]] = {}
        for line, raw in enumerate(reader, 2):
            try:
                client = int(raw["client"])
                values = {k: float(v) for k, v in raw.items() if k != "client" and v not in ("", None)}
            except (TypeError, ValueError):
                raise ConfigError(f"devices.profiles {path} line {line}: not a number") from None
            probabilities = [values[k] for k in ("availability", "dropout") if k in values]
            if not 0 <= client < n or any(v <= 0 for k, v in values.items() if k not in ("availability", "dropout")) \
                    or any(not 0 <= v <= 1 for v in probabilities):
                raise ConfigError(f"devices.profiles {path} line {line}: client must be in 0..{n - 1}, rates and "
                                  "latency > 0, availability and dropout in [0, 1]")
            rows[client] = values
    return rows


@dataclass(frozen=True)
class Availability:
    """On/off traces (``devices.availability_trace``): per client, offline windows [start, end) in simulated
    seconds and/or periodic cycles (online for ``on`` s, then offline for ``off`` s, counted from ``phase``).
    A client is online when no window and no cycle says otherwise; a client without rows is always online."""

    windows: dict[int, tuple[tuple[float, float], ...]]
    cycles: dict[int, tuple[tuple[float, float, float], ...]]

    def online(self, client: int, t: float) -> bool:
        """Whether ``client`` is online at simulated time ``t``."""
        if any(start <= t < end for start, end in self.windows.get(client, ())):
            return False
        return all((t - phase) % (on + off) < on for on, off, phase in self.cycles.get(client, ()))

    def _changes(self, client: int, t0: float, t1: float) -> Iterator[float]:
        """The times in (t0, t1] at which ``client``'s state may change, ascending."""
        points = {p for window in self.windows.get(client, ()) for p in window if t0 < p <= t1}
        for on, off, phase in self.cycles.get(client, ()):
            period = on + off
            begin = phase + math.floor((t0 - phase) / period) * period
            while begin <= t1:
                points.update(p for p in (begin, begin + on) if t0 < p <= t1)
                begin += period
        return iter(sorted(points))

    def offline_from(self, client: int, t0: float, t1: float) -> float | None:
        """The first time in [t0, t1) at which ``client`` is offline (None: online throughout)."""
        if not self.online(client, t0):
            return t0
        return next((p for p in self._changes(client, t0, t1) if p < t1 and not self.online(client, p)), None)

    def next_online(self, client: int, t0: float, t1: float) -> float | None:
        """The first time in [t0, t1] at which ``client`` is online (None: offline throughout)."""
        if self.online(client, t0):
            return t0
        return next((p for p in self._changes(client, t0, t1) if self.online(client, p)), None)


def read_trace(path: Path, n: int) -> Availability:
    """An availability trace CSV: ``client`` (0..n-1) and per row either ``start``, ``end`` (an offline window,
    simulated seconds) or ``on``, ``off`` and optionally ``phase`` (a periodic cycle); raises ConfigError."""
    if not path.is_file():
        raise ConfigError(f"devices.availability_trace = {str(path)!r}: file not found (a CSV with columns client, "
                          "start, end and/or on, off, phase)")
    windows: dict[int, list[tuple[float, float]]] = {}
    cycles: dict[int, list[tuple[float, float, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names = set(reader.fieldnames or ())
        if "client" not in names or names - set(TRACE_COLUMNS):
            raise ConfigError(f"devices.availability_trace {path}: columns must be 'client' and start, end (offline "
                              f"windows) and/or on, off, phase (cycles); got {reader.fieldnames}")
        for line, raw in enumerate(reader, 2):
            where = f"devices.availability_trace {path} line {line}"
            try:
                client = int(raw["client"])
                v = {k: float(x) for k, x in raw.items() if k != "client" and x not in ("", None)}
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: not a number") from None
            if not 0 <= client < n or not all(map(math.isfinite, v.values())):
                raise ConfigError(f"{where}: client must be in 0..{n - 1} and times finite")
            if set(v) == {"start", "end"} and 0 <= v["start"] < v["end"]:
                windows.setdefault(client, []).append((v["start"], v["end"]))
            elif set(v) - {"phase"} == {"on", "off"} and v["on"] > 0 and v["off"] > 0:
                cycles.setdefault(client, []).append((v["on"], v["off"], v.get("phase", 0.0)))
            else:
                raise ConfigError(f"{where}: give start and end (0 <= start < end: offline from start to end) or "
                                  "on and off (both > 0) with an optional phase (online for on s, then off for off s)")
    return Availability({c: tuple(sorted(w)) for c, w in windows.items()}, {c: tuple(w) for c, w in cycles.items()})


def transfer_seconds(nbytes: float, mbps: float, latency_s: float, loss: float) -> float:
    """One message: latency + serialization time at ``mbps``, stretched by retransmissions at ``loss``."""
    return latency_s + nbytes * 8 / (mbps * 1e6) / (1 - loss)


@dataclass
class Event:
    """One message's life on the clock (a line of ``clients.jsonl``)."""

    round: int
    node: int
    kind: str  # train, evaluate, or a SecAgg+ stage
    start: float
    down_s: float
    compute_s: float
    split_s: float  # split learning's activations and gradients, one round trip per step
    up_s: float
    finish: float
    bytes_down: int
    bytes_up: int
    status: str  # ok, late, unavailable, dropout, offline

    def row(self) -> dict[str, Any]:
        """The JSON row, times rounded to the microsecond (the log is hashed: no float noise)."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def log_hash(rows: list[dict[str, Any]]) -> str:
    """SHA-256 of an event log's JSON lines (what the determinism test compares)."""
    return hashlib.sha256("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()).hexdigest()
