"""Optimizer back ends behind one small interface, so the training loop does not know which one runs.

- `MegatronOptimizerBackend`: megatron-core `DistributedDataParallel` (contiguous grad buffers, bucketed
  reduce) + `get_megatron_optimizer` (Adam with decoupled weight decay; bf16/fp16 with fp32 master weights;
  fp16 dynamic loss scaling; global-norm clipping over all model-parallel ranks; `--use-distributed-optimizer`
  shards optimizer state over data-parallel ranks).
- `DeepSpeedBackend` (training/deepspeed_backend.py): DeepSpeed ZeRO as the optimizer, megatron-core's
  schedule still driving the micro-batches.

Both use megatron-core's `OptimizerParamScheduler` (linear warmup, then constant / linear / cosine decay to
--min-lr), stepped once per iteration.
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig


def build_scheduler(args: argparse.Namespace, optimizer) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )


class MegatronOptimizerBackend:
    """megatron-core DDP + optimizer. `model` holds the DDP-wrapped chunks the schedule runs."""

    name = "megatron"

    def __init__(self, args: argparse.Namespace, model_chunks: List[torch.nn.Module], config: TransformerConfig):
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16 or args.fp16,
            overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        self.model = [
            # Only the first chunk buckets its grads: later virtual-pipeline chunks finish backward first.
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(model_chunks)
        ]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            bf16=args.bf16,
            fp16=args.fp16,
            params_dtype=config.params_dtype,
            loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale,
            clip_grad=args.clip_grad,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        self.scheduler = build_scheduler(args, self.optimizer)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [chunk.no_sync for chunk in self.model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if args.overlap_grad_reduce:
            sync = [chunk.start_grad_sync for chunk in self.model]
            config.grad_sync_func = sync[0] if len(sync) == 1 else sync

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def after_forward_backward(self) -> None:
        """Gradient reduction already happened inside the schedule (finalize_model_grads)."""

    def step(self) -> Tuple[bool, Optional[float]]:
        """Returns (update applied, grad norm). fp16 overflow skips the update, as in Megatron."""
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        return update_successful, grad_norm

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> Optional[float]:
        scale = self.optimizer.get_loss_scale()
        return float(scale.item()) if torch.is_tensor(scale) else float(scale)

    def state_dict_for_checkpoint(self, model_sharded_state_dict) -> dict:
        return {
            "optimizer": self.optimizer.sharded_state_dict(model_sharded_state_dict),
            "opt_param_scheduler": self.scheduler.state_dict(),
        }


def build_optimizer_backend(args: argparse.Namespace, model_chunks: List[torch.nn.Module],
                            config: TransformerConfig):
    if args.deepspeed:
        from megatron_cocomix.training.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(args, model_chunks, config)
    return MegatronOptimizerBackend(args, model_chunks, config)
