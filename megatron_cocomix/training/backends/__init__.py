"""Optimizer back ends behind one protocol (`base.OptimizerBackend`): megatron-core's DDP + optimizer, or DeepSpeed
ZeRO. `build_optimizer_backend` is the only place that chooses between them."""

from __future__ import annotations

import argparse
from typing import List

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cocomix.training.backends.base import OptimizerBackend, build_scheduler

__all__ = ["OptimizerBackend", "build_optimizer_backend", "build_scheduler"]


def build_optimizer_backend(args: argparse.Namespace, model_chunks: List[torch.nn.Module],
                            config: TransformerConfig) -> OptimizerBackend:
    if args.deepspeed:
        from megatron_cocomix.training.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(args, model_chunks, config)
    from megatron_cocomix.training.backends.megatron import MegatronOptimizerBackend

    return MegatronOptimizerBackend(args, model_chunks, config)
