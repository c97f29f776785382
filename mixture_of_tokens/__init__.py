"""Mixture of Tokens for Hugging Face Transformers.

Importing this package registers the `mot` model type with AutoConfig, AutoModel and AutoModelForCausalLM, and
marks the classes for custom-code export, so `save_pretrained` writes an `auto_map` and the three code files and the
saved folder loads with `trust_remote_code=True` where this package is not installed.
"""

import sys
from pathlib import Path

__version__ = "0.1.0"


def _only_asked_for_help() -> bool:
    """Whether this process is `mot ... --help`: it needs the argument parsers, not the model classes, whose import
    (torch, then transformers' modeling code) would take seconds before any help is printed."""
    return Path(sys.argv[0]).name == "mot" and any(flag in ("-h", "--help") for flag in sys.argv[1:])


if not _only_asked_for_help():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .modeling.configuration_mot import PRESETS, MoTConfig
    from .modeling.modeling_mot import MoTForCausalLM, MoTModel, MoTPreTrainedModel

    AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)
    AutoModel.register(MoTConfig, MoTModel, exist_ok=True)
    AutoModelForCausalLM.register(MoTConfig, MoTForCausalLM, exist_ok=True)
    MoTConfig.register_for_auto_class()
    MoTModel.register_for_auto_class("AutoModel")
    MoTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MoTConfig", "MoTModel", "MoTForCausalLM", "MoTPreTrainedModel", "PRESETS", "__version__"]
