"""Hugging Face classes of the exported CoCoMix / pause-token model; importing this package registers them with
AutoConfig and AutoModelForCausalLM (model_type "cocomix"). torch + transformers only: no megatron import, so
an export directory (which carries copies of these two files) loads where this package is not installed."""

from transformers import AutoConfig, AutoModelForCausalLM

from megatron_cocomix.hf.configuration_cocomix import CoCoMixConfig
from megatron_cocomix.hf.modeling_cocomix import CoCoMixForCausalLM, CoCoMixModel

AutoConfig.register(CoCoMixConfig.model_type, CoCoMixConfig, exist_ok=True)
AutoModelForCausalLM.register(CoCoMixConfig, CoCoMixForCausalLM, exist_ok=True)

__all__ = ["CoCoMixConfig", "CoCoMixForCausalLM", "CoCoMixModel"]
