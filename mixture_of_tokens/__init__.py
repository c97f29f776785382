"""Mixture of Tokens for Hugging Face Transformers.

Importing this package registers the `mot` model type with AutoConfig, AutoModel and AutoModelForCausalLM, and
marks the classes for custom-code export, so `save_pretrained` writes an `auto_map` and the model's code files and the
saved folder loads with `trust_remote_code=True` where this package is not installed.

The names below are looked up when first used (PEP 562), as transformers' own `_LazyModule` does. The registration
is not lazy (transformers registers classes, not names; docs/design.md): it runs on import, except in a `mot` process
that only prints help or the version, which the `mot` console script (`mixture_of_tokens_console.py`, outside this
package so that it runs first) declares before importing the package.
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# Each public name -> the module of `modeling/` that defines it.
_DEFINED_IN = {
    "MoTConfig": "configuration_mot",
    "PRESETS": "configuration_mot",
    "MoTModel": "modeling_mot",
    "MoTForCausalLM": "modeling_mot",
    "MoTPreTrainedModel": "modeling_mot",
}

__all__ = [*_DEFINED_IN, "__version__"]


def __getattr__(name: str):
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.modeling.{_DEFINED_IN[name]}"), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_with_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .modeling.configuration_mot import MoTConfig
    from .modeling.modeling_mot import MoTForCausalLM, MoTModel

    AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)
    AutoModel.register(MoTConfig, MoTModel, exist_ok=True)
    AutoModelForCausalLM.register(MoTConfig, MoTForCausalLM, exist_ok=True)
    MoTConfig.register_for_auto_class()
    MoTModel.register_for_auto_class("AutoModel")
    MoTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _process_uses_no_model() -> bool:
    """Whether the `mot` console script has declared that this process only prints help or the version."""
    console = sys.modules.get("mixture_of_tokens_console")
    return console is not None and console.USES_NO_MODEL


if not _process_uses_no_model():
    _register_with_auto_classes()
    from .cpu_kernels import install as _install_cpu_kernels

    _install_cpu_kernels()
