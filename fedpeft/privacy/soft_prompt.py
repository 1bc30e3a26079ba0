"""A soft prompt (prompt tuning) that Opacus can compute per-example gradients for.

peft's prompt tuning computes the virtual-token embeddings for a batch of *one* and repeats them
(``get_prompt``: ``prompt_tokens[:1]`` then ``.repeat(batch_size, 1, 1)``), so Opacus' hook on the
prompt ``nn.Embedding`` sees a batch of 1 and records a single summed gradient of shape
``(1, T, H)`` instead of ``(B, T, H)``: per-example clipping then fails (or, for B = 1, is silently
the batch gradient). :class:`SoftPrompt` instead takes the batch's input embeddings, expands the
prompt to the batch inside its own forward, and registers a grad sampler: the per-example gradient of
the prompt is simply the backpropagated gradient at the prompt positions of that example.

:class:`SoftPromptModel` prepends the prompt to a Hugging Face model's input embeddings and extends
the attention mask (ones), ``token_type_ids`` (zeros) and token-level labels (-100), exactly as
peft's prompt tuning does, so ``soft_prompt.weight`` is interchangeable with peft's
``prompt_embeddings`` adapter tensor of shape ``(num_virtual_tokens, hidden)``.

:func:`per_example_prompts` does the same for a peft prompt-tuning model in place: while it is
installed, the model looks its virtual tokens up for the *whole* batch (``(B, T)`` indices into the
prompt ``nn.Embedding``), so Opacus' embedding grad sampler sees B examples; the adapter keeps peft's
names and format (``adapter.type = "prompt"`` with local DP uses this).

(Prefix tuning needs none of this: peft expands the prefix token ids to the batch *before* the prefix
encoder, so Opacus' ``nn.Embedding`` / ``nn.Linear`` grad samplers see the real batch; see tests.)
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` trainable embeddings prepended to every sequence of the batch."""

    def __init__(self, num_virtual_tokens: int, hidden: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_virtual_tokens < 1 or hidden < 1:
            raise ValueError(f"SoftPrompt needs num_virtual_tokens >= 1 and hidden >= 1, got "
                             f"{num_virtual_tokens}, {hidden}")
        weight = torch.empty(num_virtual_tokens, hidden)
        if init is None:
            nn.init.normal_(weight, std=0.02)
        else:
            if tuple(init.shape) != (num_virtual_tokens, hidden):
                raise ValueError(f"init has shape {tuple(init.shape)}, expected {(num_virtual_tokens, hidden)}")
            weight.copy_(init.detach())
        self.weight = nn.Parameter(weight)

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, L, H)`` -> ``(B, T + L, H)`` with the prompt first."""
        batch = inputs_embeds.shape[0]
        prompt = self.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([prompt, inputs_embeds], dim=1)


@register_grad_sampler(SoftPrompt)
def _soft_prompt_grad_sample(layer: SoftPrompt, activations: list[torch.Tensor],
                             backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient of the prompt: the output gradient at the prompt positions."""
    del activations
    if not layer.weight.requires_grad:
        return {}
    return {layer.weight: backprops[:, : layer.num_virtual_tokens, :].to(layer.weight.dtype).contiguous()}


class SoftPromptModel(nn.Module):
    """A frozen HF model with a trainable :class:`SoftPrompt` in front of its input embeddings.

    ``forward`` takes the usual ``input_ids`` / ``attention_mask`` / ``token_type_ids`` / ``labels``
    and returns the base model's output. Labels shaped like ``input_ids`` (causal LM) get ``-100`` for
    the virtual tokens; per-example labels (classification) pass through. Only the prompt (and any
    base parameter the caller leaves trainable, e.g. a classification head) is trained.
    """

    def __init__(self, base: nn.Module, num_virtual_tokens: int, init: torch.Tensor | None = None,
                 freeze_base: bool = True) -> None:
        super().__init__()
        self.base = base
        embeddings = base.get_input_embeddings()  # type: ignore[operator]
        self.soft_prompt = SoftPrompt(num_virtual_tokens, embeddings.embedding_dim, init=init)
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)

    @property
    def config(self) -> Any:
        return getattr(self.base, "config", None)

    def build_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     token_type_ids: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The base model's keyword inputs with the prompt prepended (embeddings, mask, types, labels)."""
        embeds = self.base.get_input_embeddings()(input_ids)  # type: ignore[operator]
        batch, n = input_ids.shape[0], self.soft_prompt.num_virtual_tokens
        kwargs: dict[str, torch.Tensor] = {"inputs_embeds": self.soft_prompt(embeds)}
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs["attention_mask"] = torch.cat(
            [torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], dim=1)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat(
                [torch.zeros(batch, n, dtype=token_type_ids.dtype, device=token_type_ids.device), token_type_ids],
                dim=1)
        if labels is not None:
            if labels.dim() == 2 and labels.shape == input_ids.shape:
                labels = torch.cat([torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels],
                                   dim=1)
            kwargs["labels"] = labels
        return kwargs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        inputs = self.build_inputs(input_ids, attention_mask, token_type_ids, labels)
        return self.base(**inputs, **kwargs)


def _is_prompt_tuning(model: nn.Module) -> bool:
    cfg = getattr(model, "active_peft_config", None)
    return str(getattr(cfg, "peft_type", "")) in ("PROMPT_TUNING", "PeftType.PROMPT_TUNING")


def _batched_get_prompt(self: Any, batch_size: int, task_ids: Any = None, max_cache_len: Any = None) -> torch.Tensor:
    """peft's ``get_prompt`` for prompt tuning, without its batch-of-one shortcut."""
    del task_ids, max_cache_len
    encoder = self.prompt_encoder[self.active_adapter]
    tokens = self.prompt_tokens[self.active_adapter].to(encoder.embedding.weight.device)
    return encoder(tokens.unsqueeze(0).expand(batch_size, -1))


def per_example_prompts(model: nn.Module) -> Callable[[], None]:
    """Make a peft prompt-tuning model compute its prompt per example; returns the undo function.

    Any other model is left alone (the undo is a no-op). The prompt values are identical; only the
    graph changes, from one lookup repeated B times to B lookups, which costs ``B x T x H`` floats.
    """
    if not _is_prompt_tuning(model):
        return lambda: None
    model.get_prompt = types.MethodType(_batched_get_prompt, model)  # type: ignore[assignment]

    def undo() -> None:
        model.__dict__.pop("get_prompt", None)
    return undo
