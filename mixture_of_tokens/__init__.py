"""Mixture of Tokens for Hugging Face Transformers.

Importing this package registers the `mot` model type with AutoConfig, AutoModel and AutoModelForCausalLM, and
marks the classes for custom-code export, so `save_pretrained` writes an `auto_map` and both code files and the
saved folder loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mot import PRESETS, MoTConfig
from .modeling_mot import MoTForCausalLM, MoTModel, MoTPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)
AutoModel.register(MoTConfig, MoTModel, exist_ok=True)
AutoModelForCausalLM.register(MoTConfig, MoTForCausalLM, exist_ok=True)
MoTConfig.register_for_auto_class()
MoTModel.register_for_auto_class("AutoModel")
MoTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MoTConfig", "MoTModel", "MoTForCausalLM", "MoTPreTrainedModel", "PRESETS", "__version__"]
