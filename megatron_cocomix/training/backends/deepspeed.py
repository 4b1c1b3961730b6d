"""DeepSpeed ZeRO as the optimizer back end, megatron-core's pipeline schedule still driving the micro-batches.

One iteration on a data-parallel rank (n = --global-batch-size / (--micro-batch-size x DP) micro-batches):

    for k in 1..n (order set by megatron's schedule: no pipelining, or 1F1B with PP):
        forward_k  on the raw model chunk        (ZeRO-3 gathers its parameter shards in module hooks)
        backward_k of loss_k / n (per-token mean) (DeepSpeed's grad hooks accumulate; ZeRO-2/3 reduce-scatter
                                                   every micro-batch into this rank's gradient partition)
    [ZeRO-1] sum grads of tied embeddings over the first/last PP stage and of sequence-parallel norms over TP,
             then reduce-scatter the accumulated grads over DP
    engine.step(): g <- mean over DP of sum_k grad_k (fp32 partition); ||g|| over all DP x TP x PP ranks;
                   g <- g * min(1, clip / (||g|| + 1e-6)); AdamW on the fp32 master partition; all-gather

DeepSpeed's `engine.forward` / `engine.backward` cannot be used: megatron's schedule already divides each
micro-batch loss by n and, with PP, calls backward on stage outputs with received gradients, so DeepSpeed's
own 1/gradient_accumulation_steps scaling would be applied twice. The schedule therefore runs the module
itself, and each micro-batch backward is framed by DeepSpeed's own prologue (a hook on the chunk's output,
as `engine.forward` registers) and epilogue (the ZeRO optimizer's post-backward callback), with the
gradient-accumulation boundary set explicitly. That per-micro-batch epilogue is what ZeRO-2 needs between
micro-batches ("gradient computed twice" without it).

Gradient norm: DeepSpeed sums squared norms over the data-parallel group and megatron's model-parallel group
(TP x PP, `DeepSpeedMPU.get_model_parallel_group`); a parameter counts on every TP rank if it is
tensor-parallel, else only on TP rank 0; the last stage's copy of a tied embedding is marked
`ds_pipe_replicated` so that it counts once, as in megatron's `clip_grad_norm`.

Supported: ZeRO-1 with any TP x PP; ZeRO-2 and ZeRO-3 with PP = 1 (their per-micro-batch gradient
partitioning does not follow a pipeline schedule's interleaved forwards and backwards, and DeepSpeed's own
pipeline engine refuses them too); no virtual pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_cocomix.deepspeed_config import check_deepspeed_config
from megatron_cocomix.distributed import DeepSpeedMPU, layout_string
from megatron_cocomix.training.backends.base import OptimizerBackend, build_scheduler
from megatron_cocomix.training.exit_conditions import DivergenceGuard, NonFiniteError

OPTIMIZER_DIR = "deepspeed_optimizer"
LAYOUT_FILE = "layout.json"
CHECKPOINT_TAG = "zero"


def param_groups(module: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> List[dict]:
    """Megatron's default grouping: no weight decay on biases and on 1-D parameters (norm weights), unless
    `decay_all` (--weight-decay-all-params). `wd_mult` is what megatron's OptimizerParamScheduler multiplies the
    scheduled weight decay by."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        exempt = not decay_all and (name.endswith(".bias") or param.dim() == 1)
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def _tp_summed_params(module: torch.nn.Module, config: TransformerConfig) -> List[torch.nn.Parameter]:
    """Parameters replicated over TP whose gradient each TP rank computes only partially: norm weights under
    sequence parallelism (each rank sees its sequence shard) and QK-layernorm weights. Their gradients are
    summed over TP, as megatron's finalize_model_grads does."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return []
    out = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if (config.sequence_parallel and getattr(param, "sequence_parallel", False)) or (
                getattr(config, "qk_layernorm", False) and ("q_layernorm" in name or "k_layernorm" in name)):
            out.append(param)
    return out


def _tied_embedding_weight(module: torch.nn.Module) -> Optional[torch.nn.Parameter]:
    """This stage's copy of the word embedding tied to the output layer, when PP puts the two on different
    stages (megatron keeps one copy on the first and one on the last stage, summing their gradients)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    inner = module
    while not hasattr(inner, "share_embeddings_and_output_weights") and hasattr(inner, "module"):
        inner = inner.module
    if not getattr(inner, "share_embeddings_and_output_weights", False):
        return None
    if not (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            or parallel_state.is_pipeline_last_stage(ignore_virtual=True)):
        return None
    return inner.shared_embedding_or_output_weight()


class DeepSpeedBackend(OptimizerBackend):
    """DeepSpeed ZeRO (stage 1/2/3) behind the optimizer back-end protocol (training/backends/base.py).

    `model` holds the raw chunk the schedule runs; `engine` is the DeepSpeedEngine around it.
    """

    name = "deepspeed"

    def __init__(self, args: argparse.Namespace, model_chunks: List[torch.nn.Module], config: TransformerConfig):
        import deepspeed

        if len(model_chunks) != 1:
            raise ValueError("--num-layers-per-virtual-pipeline-stage (virtual pipeline) is not supported with "
                             "--deepspeed; use megatron's optimizer (drop --deepspeed)")
        self.args = args
        self.ds_config = check_deepspeed_config(args, args.deepspeed_config_dict, args.deepspeed_config)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.num_micro_batches = args.num_micro_batches
        self.check_nonfinite = args.check_for_nan_in_loss_and_grad
        chunk = model_chunks[0]

        for param in chunk.parameters():
            # The last stage's copy of a tied embedding: megatron marks it `shared`; DeepSpeed skips
            # parameters marked `ds_pipe_replicated` in the norm so that the embedding counts once.
            if getattr(param, "shared", False):
                param.ds_pipe_replicated = True
        self._tp_summed = _tp_summed_params(chunk, config)
        self._tied_embedding = _tied_embedding_weight(chunk)

        groups = param_groups(chunk, args.weight_decay, args.weight_decay_all_params)
        client_optimizer = None
        if "optimizer" not in self.ds_config:
            client_optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                                 eps=args.adam_eps, weight_decay=args.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=chunk, optimizer=client_optimizer,
            model_parameters=None if client_optimizer is not None else groups,
            config=self.ds_config, mpu=DeepSpeedMPU, dist_init_required=False)
        self.optimizer = self.engine.optimizer
        # megatron's scheduler sets lr / weight decay on DeepSpeed's (fp32 partition) parameter groups.
        for group in self.optimizer.param_groups:
            group.setdefault("wd_mult", 1.0 if group.get("weight_decay", 0.0) > 0 else 0.0)
        self.scheduler = build_scheduler(args, self.optimizer)
        self.model = [chunk]

        self._backwards = 0
        self._hooks = [chunk.register_forward_pre_hook(self._before_forward),
                       chunk.register_forward_hook(self._after_forward)]
        if self.stage >= 2:
            # Gradients are reduce-scattered during the backward, so the TP sum has to happen before DeepSpeed's
            # own gradient hook sees them: a tensor hook runs on the freshly computed gradient.
            for param in self._tp_summed:
                self._hooks.append(param.register_hook(self._sum_over_tp))
        needs_scaler = getattr(self.optimizer, "needs_scaler", lambda: False)()
        self._needs_scaler = needs_scaler
        # fp16: megatron's schedule multiplies the last stage's loss by this before its backward.
        config.grad_scale_func = self.engine.scale if needs_scaler else None
        config.finalize_model_grads_func = None
        config.no_sync_func = None
        config.grad_sync_func = None

    # Micro-batch framing (see the module docstring).
    def _before_forward(self, module, inputs) -> None:
        if torch.is_grad_enabled():
            self.optimizer.clear_backward_seen_flag()

    def _after_forward(self, module, inputs, output) -> None:
        if not torch.is_grad_enabled():
            return
        from deepspeed.runtime.utils import register_output_backward_hooks

        register_output_backward_hooks(output, preprocess_once_fn=self._before_backward)

    def _before_backward(self) -> None:
        self._backwards += 1
        if self._backwards > self.num_micro_batches:
            raise RuntimeError(f"{self._backwards} micro-batch backwards in one iteration, expected "
                               f"{self.num_micro_batches}")
        # ZeRO-2/3 reduce in every backward and finish the partition at the last one; ZeRO-1 reduces after
        # the schedule, once gradients that megatron sums across stages have been summed.
        last = self._backwards == self.num_micro_batches
        self.engine.set_gradient_accumulation_boundary(last and self.stage >= 2)
        if self._needs_scaler:
            # The loss (last stage) or the received output gradient (other stages) is already scaled by
            # DeepSpeed's loss scale through config.grad_scale_func.
            self.engine._manual_backward_expected = True
        self.engine._backward_prologue()

    @staticmethod
    def _sum_over_tp(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad

    def _accumulated_grad(self, param: torch.nn.Parameter) -> Optional[torch.Tensor]:
        getter = getattr(self.optimizer, "get_gradient_for_reduction", None)
        return getter(param) if getter is not None else param.grad

    def _sum_cross_rank_grads(self) -> None:
        """ZeRO-1: the gradient sums megatron's finalize_model_grads does before the data-parallel reduce."""
        if self._tp_summed:
            grads = [self._accumulated_grad(p) for p in self._tp_summed]
            grads = [g for g in grads if g is not None]
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads)
                torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
                for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    grad.copy_(synced)
        if self._tied_embedding is not None:
            grad = self._accumulated_grad(self._tied_embedding)
            if grad is None:
                grad = torch.zeros_like(self._tied_embedding)
                self._tied_embedding.grad = grad
            torch.distributed.all_reduce(grad, group=parallel_state.get_embedding_group())

    # ---- one iteration (the protocol) ----------------------------------------------------------------
    def zero_grad(self) -> None:
        self._backwards = 0

    def after_forward_backward(self) -> None:
        if self._backwards != self.num_micro_batches:
            raise RuntimeError(f"the schedule ran {self._backwards} micro-batch backwards, expected "
                               f"{self.num_micro_batches}")
        if self.stage == 1:
            self._sum_cross_rank_grads()
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.allreduce_gradients()

    def step(self, guard: Optional[DivergenceGuard] = None) -> Tuple[bool, Optional[float]]:
        """(update applied, grad norm before clipping). fp16 overflow skips the update and the LR step.

        DeepSpeed's step reads its gradient norm on the host and cannot skip an update on the device: a diverged
        loss is read from `guard` here, before the step (one host sync per step, as DeepSpeed's own)."""
        if guard is not None:
            guard.check()
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self._backwards = 0
        applied = self.engine.was_step_applied()
        grad_norm = self.engine.get_global_grad_norm()
        if torch.is_tensor(grad_norm):
            grad_norm = grad_norm.item()
        grad_norm = None if grad_norm is None else float(grad_norm)
        if applied and self.check_nonfinite and grad_norm is not None and not math.isfinite(grad_norm):
            # DeepSpeed computes the norm inside its step, so this is found right after it; the loop stops
            # before anything is saved.
            raise NonFiniteError("grad norm", grad_norm, 0, guard.iteration if guard is not None else None)
        if applied:
            self.scheduler.step(increment=1)
        return applied, grad_norm

    @property
    def loss_scale(self) -> Optional[float]:
        if not self._needs_scaler:
            return 1.0
        scale = self.engine._get_optimizer_loss_scale()
        return None if scale is None else float(scale)

    # Parameters: ZeRO-3 keeps only this rank's 1/DP shard of each weight.
    @contextlib.contextmanager
    def _gathered(self, modify: bool):
        import deepspeed

        params = list(self.model[0].parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield

    def full_parameters(self, modify: bool = False):
        """Full parameters inside the block (data-parallel rank 0's values are re-partitioned on exit when
        modify=True). A no-op for stages 1 and 2."""
        return self._gathered(modify) if self.stage == 3 else contextlib.nullcontext()

    def local_parameter_count(self) -> int:
        # ZeRO-3 leaves a placeholder in each parameter; ds_numel is its full size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.model[0].parameters())

    def reload_model_params(self) -> None:
        """DeepSpeed's fp32 master copy still holds the initial weights and would overwrite the loaded ones at
        the next step."""
        self.optimizer.refresh_fp32_params()

    # Checkpoints: model weights go through megatron dist_checkpointing; DeepSpeed keeps its own optimizer
    # state (fp32 master partitions, Adam moments, loss scaler) in <checkpoint>/deepspeed_optimizer/pp_rank_XXX/
    # zero/, plus <checkpoint>/deepspeed_optimizer/layout.json.
    def _layout(self) -> Dict[str, int]:
        return {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
                "data_parallel_size": parallel_state.get_data_parallel_world_size(),
                "zero_stage": self.stage}

    @staticmethod
    def _stage_dir(path: str) -> str:
        # DeepSpeed names its files by TP rank ("mp_rank") and DP rank; one directory per pipeline stage keeps
        # the stages apart.
        return os.path.join(path, f"pp_rank_{parallel_state.get_pipeline_model_parallel_rank():03d}")

    def check_optimizer_loadable(self, common: dict, saved_layout: Dict[str, int],
                                 layout: Dict[str, int]) -> Optional[str]:
        reason = super().check_optimizer_loadable(common, saved_layout, layout)
        if reason is None and saved_layout != layout:
            reason = (f"DeepSpeed optimizer state was saved at {layout_string(saved_layout)} and reloads only there "
                      f"(this run: {layout_string(layout)})")
        return reason

    def save_optimizer_files(self, checkpoint_dir: str) -> None:
        path = os.path.join(checkpoint_dir, OPTIMIZER_DIR)
        stage_dir = self._stage_dir(path)
        os.makedirs(stage_dir, exist_ok=True)
        if torch.distributed.get_rank() == 0:
            with open(os.path.join(path, LAYOUT_FILE), "w") as f:
                json.dump(self._layout(), f)
        self.engine.save_checkpoint(stage_dir, tag=CHECKPOINT_TAG, save_latest=False,
                                    client_state={"layout": self._layout()})

    def load_optimizer_state(self, loaded: dict, checkpoint_dir: str) -> None:
        """DeepSpeed's ZeRO state loads only at the layout (TP, PP, DP, stage) it was saved at; anything else
        raises a one-line ValueError."""
        path = os.path.join(checkpoint_dir, OPTIMIZER_DIR)
        layout_file = os.path.join(path, LAYOUT_FILE)
        if not os.path.exists(layout_file):
            raise FileNotFoundError(f"{layout_file}: no DeepSpeed optimizer state in this checkpoint")
        with open(layout_file) as f:
            saved = json.load(f)
        if saved != self._layout():
            raise ValueError(f"{layout_file}: DeepSpeed optimizer state saved at {saved} cannot load at "
                             f"{self._layout()} (load the model weights only)")
        for directory, _, files in os.walk(self._stage_dir(path)):
            for name in files:
                # torch.save writes zip archives: a cut-short one has no central directory.
                if name.endswith(".pt") and not zipfile.is_zipfile(os.path.join(directory, name)):
                    raise ValueError(f"{os.path.join(directory, name)}: truncated or not a torch file")
        load_path, _ = self.engine.load_checkpoint(self._stage_dir(path), tag=CHECKPOINT_TAG,
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"{self._stage_dir(path)}/{CHECKPOINT_TAG}: DeepSpeed found no checkpoint")
