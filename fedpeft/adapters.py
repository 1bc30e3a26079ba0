"""The registered adapter types (``adapter.type``): each builds the peft config of one adapter.

A builder is ``(adapter section, peft task type, target modules or None, extra peft kwargs) -> peft config``
registered by name in :data:`ADAPTERS`; :func:`fedpeft.models.build_peft_model` wraps the base model with
it. peft is imported inside the builders, so the configuration can list the adapter types cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedpeft.registry import Registry

if TYPE_CHECKING:
    from fedpeft.config import AdapterSection

Builder = Callable[["AdapterSection", Any, "list[str] | None", dict[str, Any]], Any]
ADAPTERS: Registry[Builder] = Registry("adapter type")


@ADAPTERS.register("lora")
def _lora(adapter: AdapterSection, task_type: Any, targets: list[str] | None, extra: dict[str, Any]) -> Any:
    from peft import LoraConfig

    # peft annotates lora_alpha as int but scales by lora_alpha / r: a fractional alpha is valid
    return LoraConfig(task_type=task_type, r=adapter.r, lora_alpha=adapter.alpha,  # type: ignore[arg-type]
                      lora_dropout=adapter.dropout, target_modules=targets, **extra)


@ADAPTERS.register("prompt")
def _prompt(adapter: AdapterSection, task_type: Any, targets: list[str] | None, extra: dict[str, Any]) -> Any:
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type=task_type, num_virtual_tokens=adapter.num_virtual_tokens, **extra)


@ADAPTERS.register("prefix")
def _prefix(adapter: AdapterSection, task_type: Any, targets: list[str] | None, extra: dict[str, Any]) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=adapter.num_virtual_tokens, **extra)


@ADAPTERS.register("ia3")
def _ia3(adapter: AdapterSection, task_type: Any, targets: list[str] | None, extra: dict[str, Any]) -> Any:
    from peft import IA3Config

    return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=[] if targets else None,
                     **extra)
