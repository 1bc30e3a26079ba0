"""Results usable outside fedpeft: the run's ``adapter/`` in the layout plain peft expects, and merged models.

fedpeft trains classification with its own pooling head (:class:`fedpeft.models.MeanPoolClassifier`, the
backbone under ``encoder``). A run's ``adapter/`` is written so that plain transformers + peft need nothing
from fedpeft (docs/export.md shows the few lines):

- ``adapter_config.json`` / ``adapter_model.safetensors``: a peft adapter whose ``base_model_name_or_path``
  resolves (a hub name as given, a local or packaged model as its absolute path) and whose tensor names follow
  the architecture's own ``AutoModelFor...`` layout (the backbone under its ``base_model_prefix``), so
  ``AutoPeftModelForSequenceClassification`` / ``AutoPeftModelForCausalLM`` load it; ``modules_to_save`` once.
- ``labels.json``: ``{"id2label": ..., "label2id": ...}``, keyword arguments of ``from_pretrained``.
- ``pooling_head.safetensors``: the head of fedpeft's pooling (``weight``, ``bias``; the pooling, ``mean`` or
  ``cls``, in its metadata), for runs with ``model.pooling`` other than ``model``.
- the tokenizer's files.

:func:`export_merged` folds a LoRA or IA3 adapter into the base (peft's ``merge_and_unload``) and writes a
model directory that plain transformers load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedpeft import config, lora, models
from fedpeft.config import Config, ModelSection
from fedpeft.errors import FedPeftError, ModelError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"
HEAD_FILE = "pooling_head.safetensors"
SPLIT_CLIENT_FILE = "client_side.safetensors"  # a remote split run: only the client's part of the adapter
MERGEABLE = ("lora", "ia3")
OWN_PREFIX = "base_model.model.encoder."  # where fedpeft's pooling head keeps the backbone
OWN_HEAD = "base_model.model.classifier."  # and its linear layer


def base_reference(cfg: ModelSection) -> str | None:
    """What ``base_model_name_or_path`` records: a local or packaged model's absolute directory, a hub name
    as given, None for a tiny test model (built from a config, it exists nowhere)."""
    if cfg.name in models.TINY_MODELS:
        return None
    path = Path(models.model_path(cfg.name))
    return str(path.resolve()) if path.is_dir() else cfg.name


def _pooling_head(model: PeftModel) -> models.MeanPoolClassifier | None:
    """fedpeft's pooling head where it wraps the backbone (``model.pooling`` mean or cls), else None."""
    base = model.get_base_model()
    return base if isinstance(base, models.MeanPoolClassifier) else None


def _arch_prefix(head: models.MeanPoolClassifier) -> str:
    """Where the architecture's ``AutoModelFor...`` layout keeps the backbone that the pooling head wraps."""
    return f"base_model.model.{head.encoder.base_model_prefix}."


def _arch_head(head: models.MeanPoolClassifier) -> tuple[str, bool]:
    """The name of the architecture's own classification head (``classifier`` in BERT, ``score`` in decoders)
    and whether it has a bias, from the ``AutoModelForSequenceClassification`` class built on the meta device.
    An architecture without one keeps fedpeft's names: a finished run must not fail at its last step."""
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            arch = AutoModelForSequenceClassification.from_config(head.config)
    except ValueError:  # no such class for this architecture: nothing to match, keep fedpeft's names
        return "classifier", True
    name = "score" if isinstance(getattr(arch, "score", None), nn.Linear) else "classifier"
    return name, getattr(getattr(arch, name, None), "bias", None) is not None


def _rename(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}


def _to_arch_layout(tensors: dict[str, torch.Tensor], head: models.MeanPoolClassifier) -> dict[str, torch.Tensor]:
    """fedpeft's tensor names -> the architecture's: the backbone under its prefix, the linear head under the
    architecture's head name (without a bias where that has none; ``pooling_head.safetensors`` keeps it)."""
    name, bias = _arch_head(head)
    tensors = _rename(_rename(tensors, OWN_PREFIX, _arch_prefix(head)), OWN_HEAD, f"base_model.model.{name}.")
    return {k: v for k, v in tensors.items() if bias or k != f"base_model.model.{name}.bias"}


def _from_arch_layout(tensors: dict[str, torch.Tensor], head: models.MeanPoolClassifier,
                      head_file: Path) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_to_arch_layout`, the linear head taken from ``head_file``."""
    name, _ = _arch_head(head)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(f"base_model.model.{name}.")}
    return {**_rename(tensors, _arch_prefix(head), OWN_PREFIX),
            **{OWN_HEAD + k: v for k, v in load_file(str(head_file)).items()}}


def save_run_adapter(model: PeftModel, state: models.AdapterState, directory: Path, cfg: Config,
                     label_names: list[str], tokenizer: PreTrainedTokenizerBase) -> None:
    """Write the final adapter ``state`` of ``model`` as a self-contained peft adapter (see the module doc)."""
    models.save_adapter(model, state, directory)
    conf_path = directory / CONFIG_FILE
    conf = json.loads(conf_path.read_text())
    conf["base_model_name_or_path"] = base_reference(cfg.model)
    if conf.get("modules_to_save"):  # peft appends its own classifier names to the ones fedpeft passes
        conf["modules_to_save"] = list(dict.fromkeys(conf["modules_to_save"]))
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    head = _pooling_head(model)
    if head is not None:
        weights = directory / WEIGHTS_FILE
        save_file(_to_arch_layout(load_file(str(weights)), head), str(weights), metadata={"format": "pt"})
        _save_head(head, directory / HEAD_FILE, model.active_adapter)
    if cfg.model.task == "classification":
        (directory / LABELS_FILE).write_text(json.dumps(label_kwargs(label_names), indent=2) + "\n")
    tokenizer.save_pretrained(str(directory))


def _save_head(model: models.MeanPoolClassifier, path: Path, adapter: str = "default") -> None:
    """The linear head of fedpeft's pooling (the trained copy where peft wraps it), pooling in the metadata."""
    head = model.classifier
    wrapped = getattr(head, "modules_to_save", None)  # peft's ModulesToSaveWrapper
    linear = wrapped[adapter] if wrapped is not None else head
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in linear.state_dict().items()}
    save_file(tensors, str(path), metadata={"pooling": model.pooling})


def label_kwargs(label_names: list[str]) -> dict[str, dict]:
    """``id2label`` and ``label2id`` of ``label_names`` (what ``from_pretrained`` accepts as keywords)."""
    return {"id2label": {str(i): n for i, n in enumerate(label_names)},
            "label2id": {n: i for i, n in enumerate(label_names)}}


def _run_config(run_dir: Path) -> Config:
    if not (run_dir / "config.toml").is_file():
        raise FedPeftError(f"{run_dir} is not a fedpeft run directory (it has no config.toml)")
    return config.load(run_dir / "config.toml")


def load_run_model(run_dir: Path) -> tuple[Config, PeftModel]:
    """fedpeft's own model of a finished run with its saved adapter (the run's config rebuilds the base)."""
    from peft import set_peft_model_state_dict

    adapter = run_dir / "adapter"
    if (adapter / SPLIT_CLIENT_FILE).exists() and not (adapter / CONFIG_FILE).exists():
        raise FedPeftError(f"{adapter} holds only the split client's part of the adapter ({SPLIT_CLIENT_FILE}): "
                           f"the remote split server kept the body's adapters, so there is no complete model to "
                           f"export")
    if not (adapter / CONFIG_FILE).exists():
        raise FedPeftError(f"{run_dir} has no finished adapter ({adapter / CONFIG_FILE} is missing)")
    cfg = _run_config(run_dir)
    num_labels = 0
    if cfg.model.task == "classification":
        num_labels = len(json.loads((adapter / LABELS_FILE).read_text())["id2label"])
    base = models.load_base_model(cfg.model, num_labels=num_labels, seed=cfg.run.seed)
    model = models.build_peft_model(base, cfg.adapter, cfg.model.task, seed=cfg.run.seed)
    weights = load_file(str(adapter / WEIGHTS_FILE))
    head = _pooling_head(model)
    if head is not None:
        weights = _from_arch_layout(weights, head, adapter / HEAD_FILE)
    result: Any = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ModelError(f"the adapter in {adapter} does not fit the run's model: unexpected "
                         f"{sorted(result.unexpected_keys)[:3]}")
    correction = adapter / lora.CORRECTION_FILE  # exact LoRA aggregation: W0 + scale * C under the adapter
    if correction.exists():
        lora.set_correction(model, load_file(str(correction)))
    return cfg, model.eval()


def export_merged(run_dir: Path, out: Path | None = None) -> Path:
    """Fold the run's adapter into its base model and write a transformers model directory (default
    ``RUN/merged``); returns it. Prompt and prefix tuning have nothing to fold in and are refused."""
    cfg = _run_config(run_dir)
    if cfg.adapter.type not in MERGEABLE:
        raise FedPeftError(f"cannot merge a {cfg.adapter.type!r} adapter into the base model: {cfg.adapter.type} "
                           f"tuning adds virtual tokens instead of changing weights. Only {', '.join(MERGEABLE)} "
                           f"adapters merge; load {run_dir / 'adapter'} with peft instead (docs/export.md)")
    cfg, model = load_run_model(run_dir)
    out = out or run_dir / "merged"
    merged: nn.Module = model.merge_and_unload()
    if isinstance(merged, models.MeanPoolClassifier):
        merged.encoder.save_pretrained(str(out))
        _save_head(merged, out / HEAD_FILE)
    else:
        cast("PreTrainedModel", merged).save_pretrained(str(out))
    if cfg.model.task == "classification":
        labels = json.loads((run_dir / "adapter" / LABELS_FILE).read_text())
        conf_path = out / "config.json"
        conf = json.loads(conf_path.read_text())
        conf.update(labels)
        conf_path.write_text(json.dumps(conf, indent=2) + "\n")
        (out / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    models.load_tokenizer(cfg.model).save_pretrained(str(out))
    return out

