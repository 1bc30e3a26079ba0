"""The Python API: run a simulation from a notebook or a script and get the results back as objects.

``fedpeft.simulate`` does what ``fedpeft simulate`` does (same run directory, same engines, same
checkpoints) and returns a :class:`RunResult`. The configuration may be a scenario file, a nested dict
shaped like the TOML, a :class:`~fedpeft.config.Config`, or nothing (the embedded default); overrides are
``{"section.key": value}``. A user's own examples (a list of dicts, a Hugging Face ``datasets.Dataset``, a
torch ``Dataset`` whose items are dicts) are written once to a content-addressed JSONL file under the
output directory and used as ``data.source = "file"``, so every engine, ``--resume`` and the run's
``config.toml`` see the same file.

``progress=True`` shows what ``fedpeft simulate`` shows on stderr: a line per finished round and the clients'
local steps with an ETA (a live line on a terminal, plain lines elsewhere, e.g. in a notebook or a log);
a function instead of True is given each of those lines. Off by default; it changes nothing in the results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft import config as config_mod
from fedpeft import report
from fedpeft.config import Config
from fedpeft.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from fedpeft.progress import StepProgress

ConfigLike = Config | str | Path | Mapping[str, Any] | None
RoundCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunResult:
    """What a finished simulation left behind: its directory, resolved configuration and per-round metrics."""

    run_dir: Path
    config: Config
    metrics: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        """The last round's metrics row (empty if no round ran)."""
        return self.metrics[-1] if self.metrics else {}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The final global adapter tensors by their peft names (``checkpoint/global.safetensors``; with a
        remote split server, the client side only). ``run_dir/adapter`` holds them for plain peft (docs/export.md)."""
        from safetensors.torch import load_file

        return load_file(str(self.run_dir / "checkpoint" / "global.safetensors"))


def resolve_config(config: ConfigLike = None, overrides: Mapping[str, Any] | Sequence[str] = ()) -> Config:
    """A validated Config from a scenario path, a nested dict, a Config or None (the embedded default), with
    ``overrides`` as ``{"section.key": value}`` or ``["section.key=value", ...]`` applied on top."""
    if isinstance(overrides, Mapping):
        pairs = [(*_split_key(key), value) for key, value in overrides.items()]
    else:
        pairs = [config_mod.parse_override(text) for text in overrides]
    if config is None or isinstance(config, (str, Path)):
        raw: dict[str, Any] = config_mod.read_scenario(config)
    elif isinstance(config, Config):
        raw = tomllib.loads(config.to_toml())
    elif isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
    else:
        raise ConfigError(f"config must be a scenario path, a dict, a Config or None, not {type(config).__name__}")
    for section, key, value in pairs:
        config_mod.set_value(raw, section, key, value)
    return config_mod.from_dict(raw)


def _split_key(key: str) -> tuple[str, str]:
    if not isinstance(key, str) or "." not in key:
        raise ConfigError(f"override {key!r}: expected 'section.key', e.g. 'federation.rounds'")
    section, name = key.split(".", 1)
    return section, name


def dataset_file(examples: Iterable[Mapping[str, Any]], directory: Path) -> Path:
    """Write ``examples`` (dicts with the configured text/label or prompt/response columns) as JSONL under
    ``directory``, named by the hash of their content; returns the file (an existing one is reused)."""
    lines = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise DataError(f"example {i} is a {type(ex).__name__}, not a dict of columns")
        try:
            lines.append(json.dumps({k: _plain(v) for k, v in ex.items()}, ensure_ascii=False))
        except TypeError as e:
            raise DataError(f"example {i}: {e}") from None
    if not lines:
        raise DataError("no examples given")
    text = "\n".join(lines) + "\n"
    path = directory / f"dataset-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def _plain(value: Any) -> Any:
    """A JSON-ready value: tensors and numpy scalars become Python numbers or lists."""
    return value.tolist() if hasattr(value, "tolist") else value


@contextmanager
def following(run_dir: Path, callback: RoundCallback, seen: int = 0) -> Iterator[None]:
    """Call ``callback`` with each row appended to ``run_dir/metrics.jsonl`` while the block runs (every
    engine writes it, so this works for Ray too). A callback's exception is raised when the block ends."""
    from fedpeft.progress import polling

    count = seen

    def check() -> None:
        nonlocal count
        rows = report.read_metrics(run_dir) if (run_dir / report.METRICS_FILE).exists() else []
        for row in rows[count:]:
            count += 1
            callback(row)

    with polling(check, 0.5):
        yield


@contextmanager
def showing(run_dir: Path, rounds: int, seen: int, to: Console | Callable[[str], None]) -> Iterator[StepProgress]:
    """Show a run's progress while the block runs: each round recorded after the first ``seen`` as one line, and
    the clients' local steps through the yielded :class:`~fedpeft.progress.StepProgress` (hand it to
    :func:`fedpeft.simulation.runner.execute`). ``to``: a rich Console (the steps in a status line on a
    terminal, plain lines elsewhere) or a function given each line."""
    from rich.console import Console

    from fedpeft.progress import StepProgress, console_progress

    if not isinstance(to, Console):
        with following(run_dir, lambda row: to(report.round_line(row, rounds)), seen):
            yield StepProgress(rounds, to, live=False)
        return
    console = to
    with following(run_dir, lambda row: console.print(report.round_line(row, rounds), markup=False,
                                                      highlight=False), seen), \
            console.status("loading model and data, training ...") as status:
        yield console_progress(console, status, rounds)


def simulate(config: ConfigLike = None, overrides: Mapping[str, Any] | Sequence[str] = (), *,
             data: Iterable[Mapping[str, Any]] | None = None, engine: str | None = None,
             callbacks: Sequence[RoundCallback] = (), progress: bool | Callable[[str], None] = False,
             resume: str | Path | None = None) -> RunResult:
    """Run a simulation and return its :class:`RunResult`.

    ``data``: your own examples instead of ``data.source`` (see the module docstring). ``callbacks`` are
    called with each round's metrics row as it is recorded; ``progress`` shows round lines and the clients'
    steps with an ETA on stderr (True) or hands each line to the function given (both engines).
    ``resume``: a run directory to continue (``config``, ``overrides`` and ``data`` are then not used).
    """
    from fedpeft.simulation import runner

    cfg = None
    if resume is None:
        cfg = resolve_config(config, overrides)
        if data is not None:
            path = dataset_file(data, Path(cfg.output.dir) / "datasets")
            cfg = resolve_config(cfg, {"data.source": "file", "data.path": str(path.resolve())})
    cfg, run_dir = runner.prepare(cfg, None if resume is None else Path(resume))
    seen = len(report.read_metrics(run_dir))

    def each(row: dict[str, Any]) -> None:
        for hook in callbacks:
            hook(row)

    with ExitStack() as stack:
        stack.enter_context(following(run_dir, each, seen))
        steps = None
        if progress:
            from rich.console import Console

            to = Console(stderr=True) if progress is True else progress
            steps = stack.enter_context(showing(run_dir, cfg.federation.rounds, seen, to))
        runner.execute(cfg, run_dir, resume is not None, engine, progress=steps)
    return RunResult(run_dir, cfg, report.read_metrics(run_dir))
