"""Pretrain a GPT with megatron-core, optionally with CoCoMix (continuous concept mixing).

Shaped like Megatron-LM's pretrain_gpt.py: `model_provider`, `get_batch`, `loss_func`, `forward_step`,
`train_valid_test_datasets_provider`, then `pretrain(...)`. Launch with torchrun or the deepspeed launcher:

    torchrun --nproc_per_node 8 pretrain_cocomix.py --tensor-model-parallel-size 2 ... (Megatron flags)
    deepspeed pretrain_cocomix.py --deepspeed --deepspeed_config ds_config.json ...

With no arguments at all it runs the tiny CPU quickstart (examples/quickstart_args.txt).
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.utils import get_attr_wrapped_model

from megatron_cocomix.global_vars import get_args, get_tokenizer
from megatron_cocomix.model.gpt import build_gpt_model, build_transformer_config
from megatron_cocomix.training.loop import pretrain

QUICKSTART_ARGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "quickstart_args.txt")


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
    """The megatron-core GPTModel for this pipeline stage (and virtual stage)."""
    args = get_args()
    config = build_transformer_config(args)
    return build_gpt_model(args, config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def get_batch(data_iterator, vp_stage: Optional[int] = None):
    """Micro-batch for this stage: read on TP rank 0, broadcast to the other TP ranks (as Megatron).

    Middle pipeline stages get nothing: their input is the previous stage's activations."""
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if not (first or last):
        return None, None, None, None, None
    keys = ["tokens", "labels", "loss_mask", "position_ids"]
    data = next(data_iterator) if data_iterator is not None else None
    batch = tensor_parallel.broadcast_data(keys[:2] + keys[3:], data, torch.int64)
    batch["loss_mask"] = tensor_parallel.broadcast_data(["loss_mask"], data, torch.float32)["loss_mask"]
    attention_mask = None
    if get_args().reset_attention_mask:
        attention_mask = tensor_parallel.broadcast_data(["attention_mask"], data, torch.bool)["attention_mask"]
    return batch["tokens"], batch["labels"], batch["loss_mask"], attention_mask, batch["position_ids"]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token cross-entropy [b, s] -> (sum, token count, {'lm loss': [sum, count]}); the schedule divides."""
    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    from megatron_cocomix.data.datasets import build_train_valid_test_datasets

    return build_train_valid_test_datasets(get_args(), get_tokenizer(), train_val_test_num_samples)


def _quickstart_argv() -> list:
    with open(QUICKSTART_ARGS) as f:
        return [tok for line in f if not line.lstrip().startswith("#") for tok in line.split()]


if __name__ == "__main__":
    argv = sys.argv[1:] or _quickstart_argv()
    train_valid_test_datasets_provider.is_distributed = True
    pretrain(train_valid_test_datasets_provider, model_provider, forward_step, argv=argv)
