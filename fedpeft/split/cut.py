"""Cut a peft-wrapped transformers model into a U-shape: front and back on the client, body on the server.

The adapter (LoRA, IA3 or a soft prompt) is built by peft on the *whole* model first, so parameter
names and init are identical to the monolithic model; only then are the model's own modules split:

* **front** (client): embeddings (+ the soft prompt) and the first ``front_layers`` blocks;
* **body** (server): the middle blocks;
* **back** (client): the last ``back_layers`` blocks, the final norm and the head with the loss, so
  labels and logits never leave the client.

The blocks are the model's own modules (attention is not reimplemented). Each side that runs
blocks rebuilds what they need from the 2-D attention mask alone: the extended (BERT) or causal
(GPT-2, LLaMA) mask via ``transformers.masking_utils``, position ids ``0..T-1`` (what the
monolithic forward uses for right-padded batches) and, for LLaMA, the rotary embeddings.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from fedpeft.errors import SplitError
from fedpeft.models import MeanPoolClassifier, load_parameters

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class _Stack:
    """What one architecture family needs to run a slice of its blocks (not a module: holds references)."""

    def __init__(self, encoder: Any) -> None:
        # a transformers stack (an nn.Module): its submodules (embeddings, wte, embed_tokens, ...) depend on the
        # family, found below
        self.encoder = encoder
        self.config: PretrainedConfig = encoder.config
        self.layers: nn.ModuleList
        if hasattr(encoder, "embeddings") and hasattr(getattr(encoder, "encoder", None), "layer"):
            self.kind, self.layers = "bert", encoder.encoder.layer
        elif hasattr(encoder, "wte") and hasattr(encoder, "h"):
            self.kind, self.layers = "gpt2", encoder.h
        elif hasattr(encoder, "embed_tokens") and hasattr(encoder, "layers") and hasattr(encoder, "rotary_emb"):
            self.kind, self.layers = "llama", encoder.layers
        else:
            raise SplitError(f"cannot cut a {type(encoder).__name__}: supported are BERT-, GPT-2- and LLaMA-style "
                             f"stacks (embeddings + encoder.layer, wte + h, embed_tokens + layers + rotary_emb)")

    def word_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token (+ position, token type) embeddings, as the model's own forward computes them."""
        enc = self.encoder
        if self.kind == "bert":
            return enc.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings()(input_ids)
        if self.kind == "gpt2":
            pos = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
            return enc.drop(inputs_embeds + enc.wpe(pos).to(inputs_embeds.device))
        return inputs_embeds

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        """Per-layer keyword arguments rebuilt from the 2-D mask: extended/causal mask, positions, rotary."""
        cfg = self.config
        if self.kind == "bert":
            make = create_causal_mask if cfg.is_decoder else create_bidirectional_mask
            kwargs = {"past_key_values": None} if cfg.is_decoder else {}
            return {"mask": make(config=cfg, inputs_embeds=hidden, attention_mask=attention_mask, **kwargs)}
        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask2d = attention_mask.view(hidden.shape[0], -1)
        # like the model's own forward: with config.use_cache on, keys/values pass through a fresh cache (a
        # copy); SDPA's math backend (attention dropout on CPU) rounds its backward differently without it
        cache = DynamicCache(config=cfg) if getattr(cfg, "use_cache", False) else None
        mask = create_causal_mask(config=cfg, inputs_embeds=hidden, attention_mask=mask2d, past_key_values=cache,
                                  position_ids=pos)
        ctx: dict[str, Any] = {"mask": mask, "pos": pos, "cache": cache}
        if self.kind == "llama":
            ctx["rotary"] = self.encoder.rotary_emb(hidden, position_ids=pos)
        return ctx

    def run(self, layers: nn.ModuleList, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Run ``layers`` in order with the model's own calling convention."""
        for layer in layers:
            if self.kind == "bert":
                hidden = layer(hidden, ctx["mask"])
            elif self.kind == "gpt2":
                hidden = layer(hidden, ctx["cache"], ctx["mask"], None, use_cache=ctx["cache"] is not None,
                               position_ids=ctx["pos"])
            else:
                hidden = layer(hidden, attention_mask=ctx["mask"], position_embeddings=ctx["rotary"],
                               position_ids=ctx["pos"], past_key_values=ctx["cache"],
                               use_cache=ctx["cache"] is not None)
        return hidden

    def final_norm(self) -> nn.Module:
        if self.kind == "gpt2":
            return self.encoder.ln_f
        if self.kind == "llama":
            return self.encoder.norm
        return nn.Identity()

    def aux(self) -> nn.Module | None:
        """Modules the context needs besides the layers (LLaMA's rotary embedding)."""
        return self.encoder.rotary_emb if self.kind == "llama" else None


class _Passthrough(nn.Module):
    def forward(self, inputs_embeds: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=inputs_embeds)


class _PoolHead(nn.Module):
    """The repo's :class:`MeanPoolClassifier` head (pooling + classifier + loss) on given hidden states.

    It runs ``MeanPoolClassifier.forward`` itself with a pass-through encoder, so pooling, the
    classifier and the loss are exactly the monolithic code path.
    """

    def __init__(self, model: MeanPoolClassifier) -> None:
        super().__init__()
        self.encoder, self.classifier, self.pooling = _Passthrough(), model.classifier, model.pooling

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        out = MeanPoolClassifier.forward(self, attention_mask=attention_mask, inputs_embeds=hidden,  # type: ignore[arg-type]
                                         labels=labels)
        return out.loss, out.logits


class _LMHead(nn.Module):
    """A causal LM head and the model's own loss function (shifted, ignore index -100)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        causal_lm: Any = model  # a transformers causal LM: lm_head, loss_function and config by name
        self.lm_head, self._model = causal_lm.lm_head, [causal_lm]  # a list: do not register the whole model

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        logits = self.lm_head(hidden)
        model = self._model[0]
        loss = None if labels is None else model.loss_function(logits=logits, labels=labels,
                                                               vocab_size=model.config.vocab_size)
        return loss, logits


class FrontPart(nn.Module):
    """Client input side: (soft prompt +) embeddings + the first blocks; returns hidden states and the mask."""

    def __init__(self, stack: _Stack, layers: nn.ModuleList, peft_model: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__()
        self._stack, self.layers, self.embeddings = stack, layers, stack.encoder.get_input_embeddings()
        self.aux = stack.aux()
        self.num_virtual_tokens = num_virtual_tokens
        self._peft = [peft_model]  # for get_prompt; not registered
        if num_virtual_tokens:
            self.prompt_encoder = peft_model.prompt_encoder  # the soft prompt is client-side
        if stack.kind == "bert":
            self.bert_embeddings = stack.encoder.embeddings
        elif stack.kind == "gpt2":
            self.wpe = stack.encoder.wpe

    def soft_prompt(self, batch_size: int) -> torch.Tensor:
        """peft's soft prompt for ``batch_size`` rows (prompt tuning: ``num_virtual_tokens`` > 0)."""
        peft_model = cast("PeftModel", self._peft[0])  # with a soft prompt the model is peft's
        return peft_model.get_prompt(batch_size=batch_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids: torch.Tensor | None = input_ids  # None once the embeddings carry the soft prompt
        inputs_embeds = None
        if self.num_virtual_tokens:  # peft prompt tuning, as PeftModel.forward does it
            batch = input_ids.shape[0]
            inputs_embeds = self.embeddings(input_ids)
            prompts = self.soft_prompt(batch).to(inputs_embeds.dtype)
            inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
            prefix = torch.ones(batch, self.num_virtual_tokens).to(attention_mask.device)
            attention_mask = torch.cat((prefix, attention_mask), dim=1)
            ids = None
        hidden = self._stack.embed(ids, inputs_embeds)
        if len(self.layers):
            hidden = self._stack.run(self.layers, hidden, self._stack.context(hidden, attention_mask))
        return hidden, attention_mask


_FREED = ("this process freed the body's weights after the cut (split.address is set: the body runs on the "
          "split server)")


class _FreedBlock(nn.Module):
    """Stands in for a body block whose weights were freed: no parameters or buffers; calling it fails."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise SplitError(f"block {self.index} belongs to the body: {_FREED}")


class BodyPart(nn.Module):
    """Server middle: the body blocks, run on received hidden states with a mask rebuilt from the 2-D mask."""

    def __init__(self, stack: _Stack, layers: nn.ModuleList) -> None:
        super().__init__()
        self._stack, self.layers, self.aux = stack, layers, stack.aux()
        self.freed = False

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.freed:
            raise SplitError(f"cannot run the body: {_FREED}")
        return self._stack.run(self.layers, hidden, self._stack.context(hidden, attention_mask))


class BackPart(nn.Module):
    """Client output side: the last blocks, the final norm, the head and the loss."""

    def __init__(self, stack: _Stack, layers: nn.ModuleList, head: nn.Module, num_virtual_tokens: int,
                 causal: bool) -> None:
        super().__init__()
        self._stack, self.layers, self.norm, self.head = stack, layers, stack.final_norm(), head
        self.aux = stack.aux()
        self.num_virtual_tokens, self.causal = num_virtual_tokens, causal

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        if len(self.layers):
            hidden = self._stack.run(self.layers, hidden, self._stack.context(hidden, attention_mask))
        hidden = self.norm(hidden)
        if labels is not None and self.causal and self.num_virtual_tokens:  # the prompt positions carry no loss
            prefix = torch.full((labels.shape[0], self.num_virtual_tokens), -100).to(labels.device)
            labels = torch.cat((prefix, labels), dim=1)
        return self.head(hidden, attention_mask, labels)


@dataclass
class SplitModel:
    """A peft model cut in three; parameters are shared with ``peft_model`` (no copies)."""

    peft_model: nn.Module
    front: FrontPart
    body: BodyPart
    back: BackPart
    task: str
    front_layers: int
    back_layers: int
    fingerprint: str
    adapter_numel: int  # trainable elements of the whole (uncut) model, front + body + back

    @property
    def body_freed(self) -> bool:
        """True once :meth:`free_body` dropped the body's weights from this process."""
        return self.body.freed

    def free_body(self) -> int:
        """Drop the body's weights and buffers from this process; returns the bytes released.

        For a client whose body runs on a remote split server. The body blocks in the model's own
        block list are replaced by parameterless placeholders (indices kept), so the client-side
        parameter names, the client adapter and the fingerprint (computed at the cut) do not change.
        Afterwards running the body, or asking for its parameters, raises :class:`SplitError`.
        """
        if self.body.freed:
            return 0
        released = sum(t.numel() * t.element_size() for t in (*self.body.layers.parameters(),
                                                               *self.body.layers.buffers()))
        blocks = self.body._stack.layers  # the model's own ModuleList: replace in place, keep indices
        first, stop = self.front_layers, len(blocks) - self.back_layers
        for i in range(first, stop):
            blocks[i] = _FreedBlock(i)
        self.body.layers = nn.ModuleList(blocks[i] for i in range(first, stop))
        self.body.freed = True
        gc.collect()
        _trim_heap()
        log.info("freed the body's weights in this process: %d blocks, %d bytes", stop - first, released)
        return released

    def _named(self, part: str) -> dict[str, nn.Parameter]:
        if part == "server" and self.body.freed:
            raise SplitError(f"the body's adapters are not here: {_FREED}")
        owned = set()
        for module in ((self.front, self.back) if part == "client" else (self.body,)):
            owned |= {id(p) for p in module.parameters()}
        return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad and id(p) in owned}

    def client_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters of the front and back (what SplitFed aggregates), by monolithic name."""
        return self._named("client")

    def server_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters of the body (the server's adapters), by monolithic name."""
        return self._named("server")

    def client_state(self) -> dict[str, torch.Tensor]:
        """A detached fp32 CPU copy of the client's adapter state."""
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.client_parameters().items()}

    def server_state(self) -> dict[str, torch.Tensor]:
        """A detached fp32 CPU copy of the body's adapter state (its initial value for a new server)."""
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.server_parameters().items()}

    def set_client_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a client adapter state (e.g. the aggregated SplitFed global); names and shapes must match."""
        load_parameters(self.client_parameters(), state, "client side", SplitError)

    def body_names(self) -> dict[str, str]:
        """Body-relative parameter name -> monolithic name, for the body's trainable parameters."""
        full = {id(p): n for n, p in self.server_parameters().items()}
        return {n: full[id(p)] for n, p in self.body.named_parameters() if id(p) in full}


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps mid-sized freed blocks otherwise); best effort."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _head_and_encoder(base: nn.Module, task: str) -> tuple[nn.Module, nn.Module]:
    if task == "classification":
        if not isinstance(base, MeanPoolClassifier):
            raise SplitError(f"split classification needs the repo's mean/cls pooling head (model.pooling = 'mean' or "
                             f"'cls'), got {type(base).__name__}")
        return base.encoder, _PoolHead(base)
    for attr in ("transformer", "model"):
        encoder = getattr(base, attr, None)
        if isinstance(encoder, nn.Module) and hasattr(base, "lm_head"):
            return encoder, _LMHead(base)
    raise SplitError(f"cannot find the decoder stack and lm_head of a {type(base).__name__} for causal LM")


def _adapter_desc(peft_model: nn.Module) -> str:
    pcfg = getattr(peft_model, "active_peft_config", None)
    if pcfg is None:
        return ""
    return json.dumps(pcfg.to_dict(), sort_keys=True,  # sets sorted: str(set) depends on the hash seed
                      default=lambda o: sorted(map(str, o)) if isinstance(o, (set, frozenset)) else str(o))


def _fingerprint(peft_model: nn.Module, stack: _Stack, task: str, front: int, back: int) -> str:
    """Model + cut identity: config, cut, adapter config, every parameter's name/shape, sampled frozen weights."""
    h = hashlib.sha256()
    cfg = stack.config
    desc = {"kind": stack.kind, "type": cfg.model_type, "hidden": cfg.hidden_size, "layers": len(stack.layers),
            "vocab": cfg.vocab_size, "task": task, "front": front, "back": back,
            "adapter": _adapter_desc(peft_model)}
    h.update(json.dumps(desc, sort_keys=True).encode())
    for name, p in peft_model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad};".encode())
        if not p.requires_grad:
            h.update(p.detach().reshape(-1)[:16].to("cpu", torch.float32).numpy().tobytes())
    return f"{stack.kind}-{task}-{front}-{back}-{h.hexdigest()[:24]}"


def cut_model(peft_model: nn.Module, task: str, front_layers: int, back_layers: int) -> SplitModel:
    """Cut ``peft_model`` (from :func:`fedpeft.models.build_peft_model`) after ``front_layers`` blocks and
    before the last ``back_layers``; the body keeps at least one block."""
    get_base_model = getattr(peft_model, "get_base_model", None)
    base = get_base_model() if get_base_model is not None else peft_model
    encoder, head = _head_and_encoder(base, task)
    stack = _Stack(encoder)
    n = len(stack.layers)
    if front_layers < 0 or back_layers < 0 or front_layers + back_layers >= n:
        raise SplitError(f"cannot cut {n} blocks into front_layers={front_layers} + body + back_layers={back_layers}: "
                         f"both must be >= 0 and leave the server at least one block")
    if front_layers == 0:
        log.warning("front_layers = 0: the server receives plain token embeddings, which map back to token ids")
    pcfg = getattr(peft_model, "active_peft_config", None)
    peft_type = str(getattr(pcfg, "peft_type", ""))
    if "PREFIX" in peft_type.upper():
        raise SplitError("prefix tuning cannot be split (its per-layer key/value prefixes live in every block); "
                         "use lora, ia3 or prompt")
    virtual = int(getattr(pcfg, "num_virtual_tokens", 0) or 0) if "PROMPT" in peft_type.upper() else 0
    layers = list(stack.layers)
    front = FrontPart(stack, nn.ModuleList(layers[:front_layers]), peft_model, virtual)
    body = BodyPart(stack, nn.ModuleList(layers[front_layers:n - back_layers]))
    back = BackPart(stack, nn.ModuleList(layers[n - back_layers:]), head, virtual, task == "causal_lm")
    fingerprint = _fingerprint(peft_model, stack, task, front_layers, back_layers)
    log.info("cut %s into %d + %d + %d blocks (%s)", type(base).__name__, front_layers, len(body.layers),
             back_layers, fingerprint)
    numel = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return SplitModel(peft_model, front, body, back, task, front_layers, back_layers, fingerprint, numel)


def clone_body(body: BodyPart) -> BodyPart:
    """A copy of ``body`` with its own trainable parameters; frozen weights and buffers stay shared."""
    memo: dict[int, Any] = {id(p): p for p in body.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in body.buffers()})
    memo[id(body._stack)] = body._stack
    return copy.deepcopy(body, memo)
