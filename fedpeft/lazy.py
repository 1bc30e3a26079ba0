"""Modules imported on first attribute access.

Registries (aggregators, LoRA modes) live in modules whose functions need torch, but checking a
configuration needs only their names and class attributes. Such a module binds ``torch`` through
:func:`module` so that ``fedpeft config`` and the early checks of ``fedpeft simulate`` run without
importing torch (about 2 s of CPU time); the first function that uses torch imports it, through a
plain ``import torch`` (never a submodule first: see fedpeft/runtime.py). Type checkers see the real
module::

    if TYPE_CHECKING:
        import torch
    else:
        torch = lazy.module("torch")
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands for the module ``name`` and imports it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__dict__["_lazy_target"]), attr)
        self.__dict__[attr] = value  # later reads are plain attribute hits
        return value


def module(name: str) -> ModuleType:
    """The module ``name`` if it is already imported, else a stand-in that imports it on first use."""
    import sys

    return sys.modules.get(name) or LazyModule(name)
